"""Control plane cost: N flows on N interfaces, through vtap and through `tc` commands.

In a namespace of its own (N/2 veth pairs = N interfaces, a spare one, and mon0):

    vtap apply        one session (to port:mon0) with N flows, direction both, filter
                      "tcp port 80" (--filters distinct: "tcp port <1000+i>", a different
                      expression per flow): validate, store, plan, apply (2N tc filters)
    vtap status       desired vs observed for all N flows, by a fresh Client with nothing
                      compiled in memory (as a new process), median of --repeats such runs (other
                      load on the machine scatters single runs); and `vtap status` as a process
    flow add          one more flow (on the spare interface) into the N existing ones
    no-op reconcile   observe + diff with everything in place (median of several)
    vtap delete       the session and everything it put in the kernel
    peak RSS          of this process after all of the above
    tc, one process per object   what a shell script does: `tc qdisc add` per device,
                      `tc filter add` per filter (the same BPF and mirred action); past
                      --tc-sample objects it is timed on a sample and scaled up (marked so)
    tc check          `tc filter show` per device and hook (sampled the same way)
    tc -batch         all of it in one tc process, for scale

Targets: apply <= 10 s, no-op reconcile <= 1 s; with 2,000 distinct filters: apply <= 10 s,
status <= 1 s, one flow add <= 0.5 s; at 10,000 flows: apply <= 5 s, status <= 1 s, no-op
reconcile <= 1.5 s, peak RSS <= 150 MiB.

    python3 bench/control_plane.py [--flows 1000] [--filters same|distinct]      (root)
    python3 bench/control_plane.py --curve 100,1000,5000,10000    (vtap only, a process per size)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

FILTER = "tcp port 80"
TARGETS = {"apply_s": 10.0, "noop_reconcile_s": 1.0}
DISTINCT_TARGETS = {"apply_s": 10.0, "status_s": 1.0, "flow_add_s": 0.5}
CURVE_TARGETS = {"flows": 10000, "apply_s": 5.0, "status_s": 1.0, "noop_reconcile_s": 1.5, "peak_rss_mib": 150.0}
DATAPATH = "tc"  # --datapath


def filter_of(index: int, kind: str) -> str:
    return FILTER if kind == "same" else f"tcp port {1000 + index}"


def interfaces(count: int) -> list[str]:
    return [f"cp{i // 2}{'ab'[i % 2]}" for i in range(count)]


def build(netns: str, count: int) -> None:
    benchlib.new_netns(netns)
    lines = [f"link add cp{i}a type veth peer name cp{i}b" for i in range((count + 1) // 2)]
    lines += [f"link set {name} up" for name in interfaces(count)]
    lines += ["link add mon0 type veth peer name mon1", "link set mon0 up", "link set mon1 up"]
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)


def timed(action):
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


CPU: dict = {}  # name -> CPU seconds (user + system) this process spent: less disturbed by other load than wall time
USER: dict = {}  # name -> user CPU seconds alone: the Python side (system time grows with contention on the kernel's locks)


def timed_cpu(name: str, action):
    """timed(), and the CPU time it took recorded as CPU[name] (the kernel's netlink work counts as ours)."""
    started, user = time.process_time(), os.times().user
    seconds, result = timed(action)
    CPU[name] = time.process_time() - started
    USER[name] = os.times().user - user
    return seconds, result


def tc_bytecode(expression: str) -> str:
    """The expression as tc's `bpf bytecode` argument, compiled by tcpdump (not by vtap)."""
    lines = benchlib.run("tcpdump", "-ddd", "-i", "lo", expression).stdout.split("\n")
    return ",".join(line.strip() for line in lines if line.strip())


def tc_commands(devices: list[str], bytecode: str) -> list[list[str]]:
    commands = []
    for device in devices:
        commands.append(["qdisc", "add", "dev", device, "clsact"])
        for hook in ("ingress", "egress"):
            commands.append(["filter", "add", "dev", device, hook, "bpf", "bytecode", bytecode, "action", "mirred", "egress", "mirror", "dev", "mon0"])
    return commands


def tc_filters_on(device: str) -> int:
    return sum(benchlib.run("tc", "filter", "show", "dev", device, hook).stdout.count("bpf") > 0 for hook in ("ingress", "egress"))


def cli_status_s(state: str) -> tuple[float, int]:
    """`vtap status` as its own process (imports, store, plan, observe): seconds, active flows."""
    command = [os.path.join(os.path.dirname(sys.executable), "vtap"), "--state", state, "-o", "json", "status"]
    env = dict(os.environ, VTAP_DATAPATH=DATAPATH)  # the data path the SDK applied with, or it reads tcx mirrors as drift
    seconds, result = timed(lambda: subprocess.run(command, capture_output=True, text=True, check=True, env=env))
    return seconds, sum(row["state"] == "active" for row in json.loads(result.stdout))


def vtap_part(devices: list[str], spare: str, workdir: str, repeats: int, filters_kind: str) -> dict:
    from vtap_core import filters
    from vtap_core.client import Client

    flows = [{"name": f"f{i}", "interface": d, "direction": "both", "filter": filter_of(i, filters_kind)} for i, d in enumerate(devices)]
    document = {"sessions": [{"name": "cp", "to": "port:mon0", "flows": flows}]}
    state = os.path.join(workdir, "vtap.db")
    with Client(driver="linux", state=state, command="bench", datapath=DATAPATH) as client:
        apply_s, _ = timed_cpu("apply", lambda: client.apply_document(document))
        print(f"vtap apply of {len(devices)} flows: {apply_s:.2f} s", flush=True)
    status_runs, status_cpu, status_user = [], [], []
    for _ in range(repeats):
        filters._compile.cache_clear()  # nothing compiled in memory: status as a new process would run it
        with Client(driver="linux", state=state, command="bench", datapath=DATAPATH) as client:
            seconds, rows = timed_cpu("status", client.status)
            status_runs.append(seconds)
            status_cpu.append(CPU["status"])
            status_user.append(USER["status"])
            compiled_by_status = filters._compile.cache_info().misses
        del rows  # one run's rows at a time (peak RSS)
    status_s = benchlib.median(status_runs)
    filters._compile.cache_clear()
    with Client(driver="linux", state=state, command="bench", datapath=DATAPATH) as client:
        rows = client.status()
        active = sum(r.state == "active" for r in rows)
        sample = random.Random(1).sample(devices, min(10, len(devices)))
        sampled_filters = sum(tc_filters_on(d) for d in sample)
        print(f"vtap status: median {status_s:.2f} s over {repeats}, {active}/{len(rows)} flows active, {compiled_by_status} expressions compiled; tc shows {sampled_filters}/{2 * len(sample)} filters on {len(sample)} sampled devices", flush=True)
        cli_s, cli_active = cli_status_s(state)
        print(f"`vtap status` process: {cli_s:.2f} s, {cli_active} flows active", flush=True)
        add_s, _ = timed_cpu("flow_add", lambda: client.add_flow("cp", interface=spare, direction="both", filter=filter_of(len(devices), filters_kind), name="added"))
        print(f"flow add into {len(devices)} flows: {add_s:.3f} s", flush=True)
        client.delete_flow("added")
        noop, noop_cpu, noop_user = [], [], []
        changes = []
        for _ in range(repeats):
            seconds, plan = timed_cpu("noop_reconcile", client.reconcile)
            noop.append(seconds)
            noop_cpu.append(CPU["noop_reconcile"])
            noop_user.append(USER["noop_reconcile"])
            changes.append(len(plan.add) + len(plan.remove))
        print(f"no-op reconcile: median {benchlib.median(noop):.3f} s over {repeats} (changes made: {sum(changes)})", flush=True)
        remove_s, _ = timed_cpu("delete", lambda: client.delete_session("cp"))
        left = sum(tc_filters_on(d) for d in sample)
        print(f"vtap session delete: {remove_s:.2f} s; filters left on sampled devices: {left}", flush=True)
    return {
        "apply_s": apply_s,
        "status_s": status_s,
        "status_runs_s": status_runs,
        "status_compiled_expressions": compiled_by_status,
        "cli_status_s": cli_s,
        "cli_status_active": cli_active,
        "flow_add_s": add_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flows_active": active,
        "flows": len(rows),
        "sampled_devices": len(sample),
        "sampled_filters_after_apply": sampled_filters,
        "sampled_filters_after_delete": left,
        "noop_reconcile_s": benchlib.median(noop),
        "noop_reconcile_runs_s": noop,
        "noop_reconcile_changes": sum(changes),
        "cpu_s": dict(CPU, noop_reconcile=benchlib.median(noop_cpu), status=benchlib.median(status_cpu)),
        "user_cpu_s": dict(USER, noop_reconcile=benchlib.median(noop_user), status=benchlib.median(status_user)),
        "delete_s": remove_s,
    }


def tc_part(devices: list[str], netns: str, sample_devices: int) -> dict:
    """The shell-script baseline; past `sample_devices` devices, timed on those and scaled up."""
    bytecode = tc_bytecode(FILTER)
    timed_devices = devices[:sample_devices]
    scale = len(devices) / len(timed_devices)
    commands = tc_commands(timed_devices, bytecode)
    started = time.perf_counter()
    for command in commands:
        benchlib.run("tc", *command)
    per_object_s = (time.perf_counter() - started) * scale
    how = f"timed on {len(timed_devices)} devices, scaled x{scale:.1f}" if scale > 1 else "all timed"
    print(f"tc, one process per object ({len(commands) * scale:.0f} processes, {how}): {per_object_s:.2f} s", flush=True)
    check_s, found = timed(lambda: sum(tc_filters_on(d) for d in timed_devices))
    check_s *= scale
    print(f"tc check ({2 * len(devices)} `tc filter show` processes, {how}): {check_s:.2f} s, {found} filters found", flush=True)
    for device in timed_devices:
        benchlib.run("tc", "qdisc", "del", "dev", device, "clsact")
    commands = tc_commands(devices, bytecode)
    batch = "".join(" ".join(f'"{word}"' if " " in word else word for word in command) + "\n" for command in commands)
    batch_s, _ = timed(lambda: subprocess.run(["tc", "-batch", "-"], input=batch, text=True, check=True))
    print(f"tc -batch (one process, all {len(commands)} commands): {batch_s:.2f} s", flush=True)
    return {"processes": len(commands), "per_object_s": per_object_s, "check_s": check_s, "check_found_filters": found, "batch_s": batch_s, "timed_devices": len(timed_devices), "scaled_by": scale}


def run_one(args) -> tuple[dict, dict | None]:
    """vtap (and, unless --no-tc, the tc baseline) at one size, in a namespace of its own."""
    netns = f"vtapbcp{os.getpid()}"
    workdir = tempfile.mkdtemp(prefix="vtapbcp-")
    devices = interfaces(args.flows + 1)
    devices, spare = devices[:-1], devices[-1]
    try:
        build_s, _ = timed(lambda: build(netns, args.flows + 1))
        print(f"{args.flows + 1} interfaces in namespace {netns}: built in {build_s:.1f} s", flush=True)
        benchlib.enter_netns(netns)
        vtap = vtap_part(devices, spare, workdir, args.repeats, args.filters)
        tc = None if args.no_tc else tc_part(devices, netns, args.tc_sample)
    finally:
        benchlib.delete_netns(netns)
        subprocess.run(["rm", "-rf", workdir])
    return vtap, tc


def met(value, target) -> str:
    return f"target <= {target:g}  {'met' if value <= target else 'NOT met'}"


def curve(args, env) -> int:
    """vtap alone at each size, each in a fresh process (its own peak RSS)."""
    rows = []
    for size in [int(n) for n in args.curve.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, os.path.abspath(__file__), "--flows", str(size), "--filters", args.filters, "--repeats", str(args.repeats), "--datapath", args.datapath, "--no-tc", "--json-out", out.name]
            load = os.getloadavg()[0]  # other work on the machine slows the kernel's tc locks: said beside each row
            subprocess.run(command, check=True)
            rows.append(dict(json.load(open(out.name)), flows=size, loadavg_at_start=load))
    t = CURVE_TARGETS
    lines = [
        f"vtap control plane scaling: N flows (direction both, filters {args.filters}) on N interfaces, one session to port:mon0, through the SDK, datapath {args.datapath}",
        f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        "wall time (CPU time of the vtap process, user + system, in brackets: less disturbed by other load);",
        f"status (a fresh Client each run) and no-op reconcile: medians of {args.repeats} runs",
        "",
        "   flows             apply            status          flow add   no-op reconcile            delete   peak RSS   load",
    ]
    for r in rows:
        c = r["cpu_s"]
        figures = "".join(f"{r[k + '_s']:7.2f} ({c[k]:5.2f}) s " for k in ("apply", "status", "flow_add", "noop_reconcile", "delete"))
        lines.append(f"{r['flows']:8d}   {figures}{r['peak_rss_mib']:6.0f} MiB  {r.get('loadavg_at_start', float('nan')):5.2f}")
    lines += ["", "user CPU time alone (vtap's own work; system time above also counts waits on the kernel's locks, which other load lengthens)", ""]
    lines.append("   flows     apply    status  flow add    no-op    delete")
    for r in rows:
        u = r.get("user_cpu_s") or {}
        lines.append(f"{r['flows']:8d}   " + "".join(f"{u[k]:7.2f} " if k in u else "      - " for k in ("apply", "status", "flow_add", "noop_reconcile", "delete")) + "  s")
    top = next((r for r in rows if r["flows"] == t["flows"]), None)
    if top:
        lines += [
            "",
            f"at {t['flows']} flows: apply {top['apply_s']:.2f} s ({met(top['apply_s'], t['apply_s'])}), status {top['status_s']:.2f} s ({met(top['status_s'], t['status_s'])}), "
            f"no-op reconcile {top['noop_reconcile_s']:.2f} s ({met(top['noop_reconcile_s'], t['noop_reconcile_s'])}), peak RSS {top['peak_rss_mib']:.0f} MiB ({met(top['peak_rss_mib'], t['peak_rss_mib'])})",
        ]
    text = "\n".join(lines)
    print("\n" + text)
    name = "control_plane_curve" + ("_tcx" if args.datapath == "tcx" else "")
    benchlib.save(name, {"environment": env, "filters": args.filters, "datapath": args.datapath, "rows": rows, "targets": CURVE_TARGETS}, text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=1000)
    parser.add_argument("--filters", choices=("same", "distinct"), default="same", help="one expression for all flows, or one per flow")
    parser.add_argument("--repeats", type=int, default=5, help="status runs and no-op reconciles to time (medians)")
    parser.add_argument("--tc-sample", type=int, default=500, metavar="DEVICES", help="time the tc-per-object baseline on at most this many devices, scaled up")
    parser.add_argument("--no-tc", action="store_true", help="vtap only")
    parser.add_argument("--curve", metavar="SIZES", help="comma-separated flow counts: vtap only, one process per size")
    parser.add_argument("--datapath", choices=("tc", "tcx"), default="tc", help="vtap's data path (results of tcx: control_plane_curve_tcx)")
    parser.add_argument("--json-out", help=argparse.SUPPRESS)  # one size of a --curve run
    args = parser.parse_args()
    global DATAPATH
    DATAPATH = args.datapath
    if os.geteuid() != 0:
        print("bench/control_plane.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    env = benchlib.environment()
    if args.curve:
        return curve(args, env)
    vtap, tc = run_one(args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(vtap, f)
        return 0
    targets = DISTINCT_TARGETS if args.filters == "distinct" else TARGETS
    what = "a different filter per flow ('tcp port <1000+i>')" if args.filters == "distinct" else f"filter '{FILTER}'"
    lines = [
        f"vtap control plane benchmark: {args.flows} flows (direction both, {what}) on {args.flows} interfaces, target port:mon0",
        f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        f"vtap apply                 {vtap['apply_s']:8.2f} s   {met(vtap['apply_s'], targets['apply_s'])}",
        f"vtap no-op reconcile       {vtap['noop_reconcile_s']:8.3f} s   " + (f"{met(vtap['noop_reconcile_s'], TARGETS['noop_reconcile_s'])} " if "noop_reconcile_s" in targets else "") + f"(changes made: {vtap['noop_reconcile_changes']})",
        f"vtap status                {vtap['status_s']:8.2f} s   " + (f"{met(vtap['status_s'], targets['status_s'])} " if "status_s" in targets else "") + f"({vtap['flows_active']}/{vtap['flows']} flows active, {vtap['status_compiled_expressions']} expressions compiled)",
        f"`vtap status` process      {vtap['cli_status_s']:8.2f} s   ({vtap['cli_status_active']} flows active)",
        f"flow add into {args.flows:<6d}      {vtap['flow_add_s']:8.3f} s" + (f"   {met(vtap['flow_add_s'], targets['flow_add_s'])}" if "flow_add_s" in targets else ""),
        f"vtap session delete        {vtap['delete_s']:8.2f} s",
        f"peak RSS                   {vtap['peak_rss_mib']:8.0f} MiB",
        "CPU time of the vtap process (user + system; less disturbed by other load): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in vtap["cpu_s"].items()),
    ]
    if tc:
        scaled = f", timed on {tc['timed_devices']} devices and scaled x{tc['scaled_by']:.1f}" if tc["scaled_by"] > 1 else ""
        lines += [
            f"tc, a process per object   {tc['per_object_s']:8.2f} s   ({tc['processes']} processes{scaled})",
            f"tc check, per device/hook  {tc['check_s']:8.2f} s   ({tc['check_found_filters']} filters found{scaled})",
            f"tc -batch, one process     {tc['batch_s']:8.2f} s",
            "",
            f"apply: vtap is {tc['per_object_s'] / vtap['apply_s']:.1f}x faster than a tc process per object; no-op reconcile {tc['check_s'] / vtap['noop_reconcile_s']:.1f}x faster than tc checks",
        ]
    text = "\n".join(lines)
    print("\n" + text)
    name = "control_plane_distinct" if args.filters == "distinct" else "control_plane"
    benchlib.save(name, {"environment": env, "flows": args.flows, "filters": args.filters, "filter": FILTER, "vtap": vtap, "tc": tc, "targets": targets}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
