"""Fleet commands: `vtap agent` for the kvm and linux drivers (proxmox keeps its own) and `vtap hosts`."""

from __future__ import annotations

import argparse
import sys

from vtap_cli.output import FORMATS


def add_commands(subparsers):
    agent = subparsers.choices.get("agent")  # proxmox's, when its commands are installed
    if agent is None:
        agent = subparsers.add_parser("agent", help="this host's agent: keeps its taps right (proxmox: its node agent)")
        agent.add_argument("--interval", type=float, default=30.0, metavar="S", help="full resync period (default 30)")
    agent.add_argument("--ttl", type=int, default=15, metavar="S", help="kvm/linux: a dead host leaves `vtap hosts` after this long (default 15)")
    agent.set_defaults(handler=_dispatch(agent.get_default("handler")))
    hosts = subparsers.add_parser("hosts", help="the fleet's live hosts: driver, version, last reconcile, problems")
    hosts.add_argument("-o", "--output", choices=FORMATS, default=argparse.SUPPRESS, help="listing format")
    hosts.set_defaults(handler=cmd_hosts)


def _dispatch(driver_agent):
    def handler(args, ctx):
        if driver_agent is not None and ctx.config.driver == "proxmox":
            return driver_agent(args, ctx)
        return cmd_agent(args, ctx)

    return handler


def cmd_agent(args, ctx):
    import logging
    import signal
    import threading

    from vtap_core.agent import Agent
    from vtap_core.errors import ValidationError
    from vtap_core.redact import RedactingFilter

    if args.interval <= 0:
        raise ValidationError("interval", f"{args.interval} must be more than 0 seconds")
    if args.ttl < 2:
        raise ValidationError("ttl", f"{args.ttl} must be at least 2 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vtap agent: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    client = ctx.client()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(client, client.host, interval=args.interval, ttl=args.ttl)
    if getattr(args, "once", False):
        agent.run_once()
        return 0
    agent.run(stop)
    return 0


def cmd_hosts(args, ctx):
    store = ctx.client().store
    rows = store.hosts()
    for leader in store.leaders():  # an elected follower of a central manager (vCenter) need not run an agent
        row = next((r for r in rows if r["host"] == leader["host"]), None)
        if row is None:
            rows.append(row := {"host": leader["host"], "driver": leader["driver"]})
        row["leads"] = f"{leader['platform']} (pid {leader['pid']}, since {leader['since']})"
    ctx.emit(rows, ["host", "driver", "version", "last_reconcile", "problems", "leads"])
    return 0


def status_rows(client) -> list[dict]:
    """This machine's view of every flow, and beside it what each host's agent reported (stale when its lease ended)."""
    rows = [row.to_dict() for row in client.status()]
    reported = client.store.observed()
    if not reported:
        return rows  # one host: exactly what `status` always showed
    live = {h["host"] for h in client.store.hosts() + client.store.leaders()}  # an elected follower reports too
    rows = [{**row, "host": "(here)"} for row in rows]
    rows += [{**row, "state": row["state"] if row["host"] in live else f"stale ({row['state']})"} for row in reported]
    return sorted(rows, key=lambda r: (r["session"], r["flow"], r["host"]))
