"""`vtap`: the command line. A thin layer over vtap_core.client.Client.

Grammar is `vtap [global options] <object> <action>`; exit codes are
0 ok, 1 operation failed, 2 usage or validation error; errors are one line on
stderr, tracebacks only with --debug. Module imports stay cheap so that
`vtap --help` is fast and loads no driver.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

from vtap_cli.output import FORMATS

EPILOG = """\
directions: for a VM, its own point of view (out = sent by the VM, in = received by it);
for a host interface, the interface's (as tcpdump -Q in|out).
targets: port:IFNAME  vm:UUID[#MAC]  vxlan://HOST[:PORT]?vni=N  gre://HOST?key=N
         erspan://HOST?version=2|3&id=N  pcap:PATH
exit codes: 0 ok, 1 operation failed, 2 usage or validation error
"""

PCAP_LIFE = """\
pcap:PATH targets: vtap starts one capture process per session, detached and owned by
vtap (pid and log in the state dir). It reads only the copies the kernel mirrors to a
vtap-owned sink device (never promiscuous), writes pcapng (mode 0600; frames cut to
--snaplen, original length kept) and flushes whenever idle, so the file can be read
while it grows. Deleting or disabling the session stops it with SIGTERM and the file
is closed cleanly; a process orphaned by a crash is found and stopped by the next
reconcile. Nothing rotates the file: it grows until the session ends."""

# Driver-specific command sets living in cli/<name>.py, each with add_commands(subparsers).
EXTENSIONS = ("kvm", "proxmox", "vsphere", "fleet")
SECRET_FLAGS = ("--password", "--token", "--token-value", "--secret")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit 2 (argparse's own usage dump is noise in scripts).
        sys.stderr.write(f"vtap: error: {message} (see: {self.prog} --help)\n")
        sys.exit(2)


class Context:
    """What a command handler gets: parsed args, output, and a Client on demand."""

    def __init__(self, args):
        self.args = args
        self._client = None
        self._config = None

    @property
    def config(self):
        if self._config is None:
            from vtap_core.config import Config

            flags = {k: getattr(self.args, k, None) for k in ("driver", "state", "store", "uri", "url", "user", "insecure", "node")}
            self._config = Config(flags, config_path=self.args.config)
        return self._config

    def client(self, driver: str | None = None):
        if self._client is None:
            from vtap_core.client import Client

            from vtap_core.redact import check_url_settings

            config = self.config
            # Refused whatever the driver: the command line goes into the audit log.
            check_url_settings({k: getattr(self.args, k, None) for k in ("url", "uri") if getattr(self.args, k, None)})
            name = driver or config.driver
            settings = config.driver_settings(name)
            self._prompt_for_password(name, settings)
            command = "vtap " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            self._client = Client(driver=name, state=config.state, command=command, store=config.store, store_settings=config.store_settings(),
                                  leader_wait=self.args.wait, **settings)
        return self._client

    def _prompt_for_password(self, driver, settings):
        from vtap_core import registry

        spec = registry.settings_spec(driver)
        if "password" in spec and "password" not in settings and settings.get("user") and not settings.get("token_value"):
            if sys.stdin.isatty():
                import getpass

                settings["password"] = getpass.getpass(f"password for {settings['user']}: ")

    def emit(self, rows, columns):
        from vtap_cli.output import emit

        emit(rows, columns, self.args.output)

    def say(self, text):
        print(text)

    def close(self):
        if self._client is not None:
            self._client.close()


def build_parser() -> Parser:
    parser = Parser(
        prog="vtap",
        description="vtap: a virtual TAP. Mirror VM traffic, filtered in the kernel, to a port, VM, tunnel or pcapng file, and keep it right as VMs move.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--driver", help="platform driver: linux (default), lab, kvm, vsphere, proxmox (env VTAP_DRIVER)")
    parser.add_argument("--state", metavar="PATH", help="store file (env VTAP_STATE; default /var/lib/vtap/state.db as root)")
    parser.add_argument("--store", metavar="URL", help="shared store of a fleet: etcd://HOST:PORT[,HOST:PORT...]/PREFIX or etcds://... (env VTAP_STORE; default the --state file)")
    parser.add_argument("--host", metavar="NAME", help="this machine's name in the fleet (env VTAP_HOST; default the host name)")
    parser.add_argument("--wait", type=float, default=5.0, metavar="S",
                        help="fleet of a central manager (vsphere on etcd): how long a change waits for the elected follower's report of it (default 5)")
    parser.add_argument("--config", metavar="PATH", help="config file (env VTAP_CONFIG; default /etc/vtap/config.toml as root)")
    parser.add_argument("-o", "--output", choices=FORMATS, default="table", help="listing format")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    connection = parser.add_argument_group("driver connection (also from the environment or the config file)")
    connection.add_argument("--uri", help="kvm: libvirt URI (env VTAP_LIBVIRT_URI; default qemu:///system)")
    connection.add_argument("--url", help="vsphere/proxmox: API URL (env VTAP_VSPHERE_URL / VTAP_PROXMOX_URL)")
    connection.add_argument("--user", help="vsphere/proxmox: user; the password comes from the environment, the config file or a prompt, never argv")
    connection.add_argument("--insecure", action="store_const", const=True, default=None, help="do not verify TLS certificates")
    connection.add_argument("--node", help="proxmox: the node this runs on (default: host name)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    def listing(sub, name, **kwargs):
        p = sub.add_parser(name, **kwargs)
        p.add_argument("-o", "--output", choices=FORMATS, default=argparse.SUPPRESS, help="listing format")
        return p

    listing(commands, "drivers", help="list installed drivers").set_defaults(handler=cmd_drivers)

    vm = commands.add_parser("vm", help="VMs the driver sees").add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    vm.required = True
    listing(vm, "list", help="list VMs with their NICs").set_defaults(handler=cmd_vm_list)

    session = commands.add_parser("session", help="mirror sessions").add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    session.required = True
    create = session.add_parser("create", help="create a session", epilog=PCAP_LIFE, formatter_class=argparse.RawDescriptionHelpFormatter)
    create.add_argument("name")
    create.add_argument("--to", required=True, metavar="TARGET", help="port:IFNAME | vm:UUID[#MAC] | vxlan://HOST[:PORT]?vni=N | gre://HOST?key=N | erspan://HOST?version=2|3&id=N | pcap:PATH")
    create.add_argument("--snaplen", metavar="N", help="bytes kept of each frame (where the driver can)")
    create.add_argument("--sample", metavar="N", help="mirror 1 in N packets")
    create.add_argument("--backend", metavar="NAME", help="data path, for drivers with several (kvm: tc|ovs)")
    create.add_argument("--disabled", action="store_true", help="record it without realizing it")
    create.set_defaults(handler=cmd_session_create)
    listing(session, "list", help="list sessions").set_defaults(handler=cmd_session_list)
    show = listing(session, "show", help="show one session and its flows")
    show.add_argument("name")
    show.set_defaults(handler=cmd_session_show)
    delete = session.add_parser("delete", help="delete a session and its flows")
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_session_delete)
    for verb, flag in (("enable", True), ("disable", False)):
        toggle = session.add_parser(verb, help=f"{verb} a session")
        toggle.add_argument("name")
        toggle.set_defaults(handler=cmd_session_toggle, enabled=flag)

    flow = commands.add_parser("flow", help="sources inside a session").add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    flow.required = True
    add = flow.add_parser("add", help="add a flow to a session")
    add.add_argument("session")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--vm", metavar="UUID|NAME")
    source.add_argument("--interface", metavar="IFNAME")
    source.add_argument("--select", metavar="EXPR", help="every VM that matches, now and later: KEY=GLOB or KEY!=GLOB joined by ',' (keys: name, tag, folder, pool, host, network)")
    add.add_argument("--nic", metavar="MAC", help="one NIC of the VM (default: all)")
    add.add_argument("--direction", default="both", metavar="in|out|both", help="VM: out = sent by the VM; interface: as tcpdump -Q (default both)")
    add.add_argument("--filter", metavar="EXPR", help="pcap filter expression (tcpdump syntax)")
    add.add_argument("--name", help="flow name (default <session>-<n>)")
    add.add_argument("--host", dest="flow_host", metavar="NAME", help="interface flows in a fleet: the host whose interface it is (default: this host, --host of vtap / VTAP_HOST / host name)")
    add.set_defaults(handler=cmd_flow_add)
    flows = listing(flow, "list", help="list flows")
    flows.add_argument("--session")
    flows.set_defaults(handler=cmd_flow_list)
    show_flow = listing(flow, "show", help="one flow; for a selector flow, each VM it taps now and why")
    show_flow.add_argument("name")
    show_flow.set_defaults(handler=cmd_flow_show)
    remove = flow.add_parser("delete", help="delete a flow")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_flow_delete)

    apply = commands.add_parser("apply", help="make the sessions in a YAML file true")
    apply.add_argument("-f", "--file", required=True, metavar="FILE.yaml")
    apply.add_argument("--prune", action="store_true", help="also delete this driver's sessions not in the file")
    apply.set_defaults(handler=cmd_apply)
    listing(commands, "status", help="each flow desired vs observed, with kernel counters").set_defaults(handler=cmd_status)
    listing(commands, "audit", help="who changed what, when").set_defaults(handler=cmd_audit)

    follow = commands.add_parser("follow", help="keep taps right as VMs start, stop and move (until SIGTERM)")
    follow.add_argument("--interval", type=float, default=30.0, metavar="S", help="full resync period (default 30)")
    follow.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this port")
    follow.add_argument("--once", action="store_true", help="one full resync, then exit")
    follow.add_argument("--leader-ttl", type=int, default=5, metavar="S",
                        help="fleet of a central manager (vsphere on etcd): the elected follower's lease; a standby takes over this long after it dies (default 5)")
    follow.set_defaults(handler=cmd_follow)

    capture = commands.add_parser("capture", help="terminate a VXLAN, GRE or ERSPAN mirror stream into pcapng and/or a local device")
    capture.add_argument("--listen", required=True, metavar="vxlan://ADDR[:PORT]|gre://ADDR|erspan://ADDR[?id=N]")
    capture.add_argument("-w", dest="write", metavar="FILE.pcapng")
    capture.add_argument("--to", metavar="port:IFNAME", help="re-emit the inner frames on a local device (for an IDS)")
    capture.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    capture.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    capture.set_defaults(handler=cmd_capture)

    demo = commands.add_parser("demo", help="a self-contained lab: real namespaces, real packets, a tap that follows a VM")
    demo.add_argument("--keep", action="store_true", help="leave the lab in place afterwards")
    demo.set_defaults(handler=cmd_demo)

    for name in EXTENSIONS:
        if importlib.util.find_spec(f"vtap_cli.{name}") is not None:
            importlib.import_module(f"vtap_cli.{name}").add_commands(commands)
    return parser


# ---------------------------------------------------------------- handlers


def cmd_drivers(args, ctx):
    from vtap_core import registry

    rows = []
    for name in registry.driver_names():
        rows.append({"name": name, "settings": ", ".join(sorted(registry.settings_spec(name))) or "-"})
    ctx.emit(rows, ["name", "settings"])
    return 0


def cmd_vm_list(args, ctx):
    vms = ctx.client().vms()
    if args.output != "table":
        ctx.emit([vm.to_dict() for vm in vms], [])
        return 0
    rows = []
    for vm in vms:
        nics = [" ".join(str(v) for v in (n.mac, n.device, n.network, *_pairs(n.details)) if v) for n in vm.nics]
        place = " ".join(f"{k}={v}" for k, v in (("folder", vm.folder), ("pool", vm.pool)) if v)
        rows.append({"uuid": vm.uuid or "-", "name": vm.name, "state": vm.state, "host": vm.host, "nics": nics, "tags": ",".join(vm.tags),
                     "details": " ".join(filter(None, [place, *_pairs(vm.details)]))})
    ctx.emit(rows, ["uuid", "name", "state", "host", "nics", "tags", "details"])
    return 0


def _pairs(details: dict) -> list[str]:
    """Driver-specific facts (vmid, virtualport, VLAN tag...) as key=value, leaving out empty ones."""
    return [f"{k}={v}" for k, v in details.items() if v not in (None, False, "")]


def cmd_session_create(args, ctx):
    change = ctx.client().create_session(
        args.name, to=args.to, snaplen=args.snaplen, sample=args.sample, backend=args.backend, enabled=not args.disabled
    )
    ctx.say(str(change))
    return 0


def session_rows(client):
    counts = {}
    for flow in client.flows():
        counts[flow.session] = counts.get(flow.session, 0) + 1
    return [{**s.to_dict(), "flows": counts.get(s.name, 0)} for s in client.sessions()]


def cmd_session_list(args, ctx):
    ctx.emit(session_rows(ctx.client()), ["name", "to", "snaplen", "sample", "backend", "enabled", "flows"])
    return 0


def cmd_session_show(args, ctx):
    client = ctx.client()
    session = client.session(args.name).to_dict()
    session["flows"] = [f.to_dict() for f in client.flows(args.name)]
    if args.output == "table":
        ctx.emit([{k: v for k, v in session.items() if k != "flows"}], ["name", "to", "snaplen", "sample", "backend", "enabled"])
        ctx.emit(session["flows"], ["name", "vm", "nic", "interface", "direction", "filter"])
    else:
        from vtap_cli.output import emit

        emit(session, [], args.output)
    return 0


def cmd_session_delete(args, ctx):
    ctx.say(str(ctx.client().delete_session(args.name)))
    return 0


def cmd_session_toggle(args, ctx):
    ctx.say(str(ctx.client().set_session_enabled(args.name, args.enabled)))
    return 0


def cmd_flow_add(args, ctx):
    change = ctx.client().add_flow(
        args.session, vm=args.vm, nic=args.nic, interface=args.interface, direction=args.direction, filter=args.filter, name=args.name, select=args.select,
        host=args.flow_host,
    )
    ctx.say(str(change))
    return 0


def cmd_flow_list(args, ctx):
    rows = [f.to_dict() for f in ctx.client().flows(args.session)]
    ctx.emit(rows, ["name", "session", "vm", "nic", "interface", "select", "direction", "filter"])
    return 0


def cmd_flow_show(args, ctx):
    client = ctx.client()
    flow = next((f for f in client.flows() if f.name == args.name), None)
    members = client.flow_members(args.name)
    if args.output != "table":
        ctx.emit([{**flow.to_dict(), "members": [m.__dict__ for m in members]}] if flow else [], [])
        return 0
    ctx.emit([flow.to_dict()], ["name", "session", "vm", "nic", "interface", "select", "direction", "filter"])
    if flow.source.select:
        ctx.say(f"members ({len(members)}):")
        ctx.emit([m.__dict__ for m in members], ["vm_name", "vm", "nic", "host", "why"])
    return 0


def cmd_flow_delete(args, ctx):
    ctx.say(str(ctx.client().delete_flow(args.name)))
    return 0


def cmd_apply(args, ctx):
    ctx.say(str(ctx.client().apply_file(args.file, prune=args.prune)))
    return 0


def cmd_status(args, ctx):
    from vtap_cli.fleet import status_rows

    rows = status_rows(ctx.client())  # in a fleet, each host's agent's rows too
    if args.output == "table":
        # A selector flow's members follow it, one line each.
        rows = [line for row in rows for line in [row, *({**row, **m, "flow": f"  {m['name']}", "source": f"vm {m['vm']}" + (f" nic {m['nic']}" if m["nic"] else ""), "problem": ""} for m in row.get("members") or [])]]
    host = ["host"] if any("host" in row for row in rows) else []
    ctx.emit(rows, ["session", "flow", *host, "source", "direction", "target", "state", "desired", "observed", "packets", "bytes", "capture_dropped", "problem"])
    return 0


def cmd_audit(args, ctx):
    rows = ctx.client().audit()
    if args.output == "table":
        import json

        rows = [{**row, "change": json.dumps(row["change"], sort_keys=True)} for row in rows]
    ctx.emit(rows, ["id", "time", "user", "driver", "command", "change"])
    return 0


def cmd_follow(args, ctx):
    import logging
    import signal
    import threading

    from vtap_core.follow import Follower
    from vtap_core.leader import election_for, reconcile_elected, run_elected
    from vtap_core.redact import RedactingFilter
    from vtap_core.store import host_name

    if args.interval <= 0:
        raise_usage("interval", f"{args.interval} must be more than 0 seconds")
    if not 2 <= args.leader_ttl <= 3600:
        raise_usage("leader-ttl", f"{args.leader_ttl} must be 2 to 3600 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vtap follow: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    client = ctx.client()
    client.store.check_writable()  # a store this vtap cannot fully read must not drive the platform
    metrics = None
    if args.metrics_port is not None:
        from vtap_core.metrics import PrometheusMetrics

        metrics = PrometheusMetrics(port=args.metrics_port, driver=client.driver_name)
    follower = Follower(client, interval=args.interval, metrics=metrics)
    election = election_for(client, host_name(), args.leader_ttl)
    if args.once:
        plan = client.reconcile() if election is None else reconcile_elected(client, election)
        if plan is None:
            ctx.say(f"another follower leads {election.platform}: nothing done")
            return 0
        ctx.say(f"resync: {len(plan.add)} applied, {len(plan.remove)} removed, {len(plan.keep)} kept")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("vtap.follow").info("following driver %s (resync every %ss)", client.driver_name, args.interval)
    if election is None:
        follower.run(stop)
    else:  # one central manager for the whole fleet: only the elected follower applies
        run_elected(client, follower, election, stop)
    logging.getLogger("vtap.follow").info("stopped")
    return 0


def cmd_capture(args, ctx):
    from vtap_drivers.linux.capture import parse_vxlan_listen
    from vtap_drivers.linux.terminate import terminate_counted

    if str(args.listen).startswith("vxlan://"):
        parse_vxlan_listen(args.listen)  # its stricter rules (vni=5&vni=6 is refused)
    counts = terminate_counted(args.listen, args.write, to=args.to, count=args.count, duration=args.duration)
    where = " and ".join(w for w in (args.write, args.to) if w)
    unread = f"; {counts.unread} left unread in the ring when it stopped" if counts.unread else ""
    print(f"{counts.kept} frames written to {where}; {counts.dropped} tunnel packets dropped by the kernel (no room in the ring){unread}", file=sys.stderr)
    return 0


def cmd_demo(args, ctx):
    from vtap_drivers.lab.demo import run_demo

    return run_demo(keep=args.keep, state=ctx.args.state)


def raise_usage(field, rule):
    from vtap_core.errors import ValidationError

    raise ValidationError(field, rule)


def refuse_secrets_on_argv(argv):
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            sys.stderr.write(
                f"vtap: error: {flag} is not accepted on the command line (it would be visible to every user): "
                "use the environment (e.g. VTAP_VSPHERE_PASSWORD), the config file, or the prompt\n"
            )
            sys.exit(2)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    refuse_secrets_on_argv(argv)
    args = build_parser().parse_args(argv)
    if args.host:
        os.environ["VTAP_HOST"] = args.host  # read where this host's name is needed (audit rows, agents)
    ctx = Context(args)
    try:
        return args.handler(args, ctx) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from vtap_core.errors import VtapError
        from vtap_core.redact import redact

        if args.debug:
            raise
        if isinstance(exc, VtapError):
            sys.stderr.write(f"vtap: {redact(exc)}\n")
            return exc.exit_code
        sys.stderr.write(f"vtap: unexpected error: {type(exc).__name__}: {redact(exc)} (run with --debug for details)\n")
        return 1
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
