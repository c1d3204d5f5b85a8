"""Proxmox VE commands: `vtap agent`, `vtap hook VMID PHASE`, `vtap hook install`.

Imports nothing heavy at module level: `vtap --help` must not load proxmoxer.
"""

from __future__ import annotations

import argparse
import os

DRIVER = "proxmox"


def add_commands(subparsers):
    agent = subparsers.add_parser("agent", help="proxmox: keep this node's taps right (poll the cluster every interval)")
    # SUPPRESS: without --node here, the global --node (or VTAP_PROXMOX_NODE, or the host name) stands.
    agent.add_argument("--node", default=argparse.SUPPRESS, help="this node's name (default: host name)")
    agent.add_argument("--interval", type=float, default=10.0, metavar="S", help="polling interval in seconds (default 10)")
    agent.add_argument("--once", action="store_true", help="run one cycle and exit")
    agent.set_defaults(handler=cmd_agent)

    hook = subparsers.add_parser(
        "hook",
        help="proxmox: hookscript (`vtap hook VMID PHASE`) and `vtap hook install`",
        description="As a PVE hookscript: vtap hook VMID PHASE (pre-start|post-start|pre-stop|post-stop).\n"
        "To install it: vtap hook install (--vm VMID ... | --all) --storage STORAGE [--strict].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hook.add_argument("vmid", metavar="VMID|install")
    hook.add_argument("phase", nargs="?", metavar="PHASE")
    hook.add_argument("--vm", action="append", metavar="VMID", help="install: this VM (repeatable)")
    hook.add_argument("--all", action="store_true", help="install: every VM of the cluster")
    hook.add_argument("--storage", metavar="STORAGE", help="install: a storage with the snippets content type")
    hook.add_argument("--strict", action="store_true", help="install: let a failing hook fail the VM's phase")
    hook.set_defaults(handler=cmd_hook)


def _desired_state(client):
    from vtap_drivers.proxmox.agent import StoreState
    from vtap_drivers.proxmox.desired import DesiredState

    driver = client.driver
    if driver.shared_state:
        return DesiredState(driver.shared_state, client.store.state_dir)
    return StoreState(client.store)


def cmd_agent(args, ctx):
    import logging
    import signal
    import threading

    from vtap_core.errors import ValidationError
    from vtap_drivers.proxmox.agent import Agent

    if args.interval <= 0:
        raise ValidationError("interval", f"{args.interval} must be more than 0 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vtap agent: %(message)s")
    client = ctx.client(DRIVER)
    agent = Agent(client.driver, _desired_state(client), interval=args.interval, lock=client.lock)
    if args.once:
        agent.run(threading.Event(), once=True)
        plan = agent.last_plan
        ctx.say(f"node {client.driver.node}: {len(plan.add)} applied, {len(plan.remove)} removed, {len(plan.keep)} kept")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("vtap.proxmox.agent").info("node %s: polling every %ss", client.driver.node, args.interval)
    agent.run(stop)
    return 0


def cmd_hook(args, ctx):
    from vtap_core.errors import ValidationError

    if args.vmid == "install":
        if args.phase:
            raise ValidationError("hook install", f"unexpected {args.phase!r}: use --vm VMID or --all")
        if not args.storage:
            raise ValidationError("storage", "hook install needs --storage STORAGE (one with the snippets content type)")
        from vtap_drivers.proxmox.hook import install

        ctx.say(install(ctx.client(DRIVER).driver, args.storage, vmids=args.vm, all_vms=args.all, strict=args.strict))
        return 0
    if args.vm or args.all or args.storage or args.strict:
        raise ValidationError("hook", "--vm/--all/--storage/--strict go with `vtap hook install`")
    if args.phase is None:
        raise ValidationError("phase", "usage: vtap hook VMID PHASE (as PVE calls a hookscript)")
    import logging

    from vtap_drivers.proxmox.hook import hook_main

    logging.basicConfig(level=logging.WARNING, format="vtap hook: %(message)s")
    strict = os.environ.get("VTAP_HOOK_STRICT", "") in ("1", "true", "yes")
    try:
        driver, desired_state = _hook_driver(ctx)
    except Exception as exc:  # noqa: BLE001 - even a broken configuration must not fail a VM start
        if strict and args.phase == "pre-start":  # the only phase whose failure PVE acts on
            raise
        import sys

        print(f"vtap: hook {args.vmid} {args.phase} failed, VM continues without its taps: {exc}", file=sys.stderr)
        return 0
    return hook_main(driver, desired_state, args.vmid, args.phase, strict)


def _hook_driver(ctx):
    """(driver, desired state) for a hook. With a shared document (a cluster), no Client: the hook then
    needs no store, no entry-point loading and no API library, and post-start runs inside `qm start`."""
    from vtap_core.store import default_path
    from vtap_drivers.proxmox.desired import DesiredState
    from vtap_drivers.proxmox.driver import ProxmoxDriver

    state_dir = os.path.dirname(os.path.abspath(ctx.config.state or default_path()))
    driver = ProxmoxDriver(state_dir=state_dir, **ctx.config.driver_settings(DRIVER))
    if not driver.shared_state:
        client = ctx.client(DRIVER)
        return client.driver, _desired_state(client)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)  # where the last good copy of the document is kept
    return driver, DesiredState(driver.shared_state, state_dir)
