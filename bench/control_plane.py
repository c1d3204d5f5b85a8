"""Control plane cost: 1,000 flows on 1,000 interfaces, through vtap and through `tc` commands.

In a namespace of its own (500 veth pairs = 1,000 interfaces, and mon0):

    vtap apply        one session (to port:mon0) with 1,000 flows, direction both,
                      filter "tcp port 80": validate, store, plan, apply (2,000 tc filters)
    vtap status       desired vs observed for all 1,000 flows
    no-op reconcile   observe + diff with everything in place (median of several)
    vtap delete       the session and everything it put in the kernel
    tc, one process per object   what a shell script does: `tc qdisc add` per device,
                      `tc filter add` per filter (the same BPF and mirred action)
    tc check          `tc filter show` per device and hook: a script's "is it still there?"
    tc -batch         all of it in one tc process, for scale

Targets: apply <= 10 s, no-op reconcile <= 1 s.

    python3 bench/control_plane.py [--flows 1000]      (root)
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

FILTER = "tcp port 80"
TARGETS = {"apply_s": 10.0, "noop_reconcile_s": 1.0}


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


def vtap_part(devices: list[str], workdir: str, repeats: int) -> dict:
    from vtap_core.client import Client

    document = {"sessions": [{"name": "cp", "to": "port:mon0", "flows": [{"name": f"f{i}", "interface": d, "direction": "both", "filter": FILTER} for i, d in enumerate(devices)]}]}
    with Client(driver="linux", state=os.path.join(workdir, "vtap.db"), command="bench") as client:
        apply_s, _ = timed(lambda: client.apply_document(document))
        print(f"vtap apply of {len(devices)} flows: {apply_s:.2f} s", flush=True)
        status_s, rows = timed(client.status)
        active = sum(r.state == "active" for r in rows)
        sample = random.Random(1).sample(devices, min(10, len(devices)))
        sampled_filters = sum(tc_filters_on(d) for d in sample)
        print(f"vtap status: {status_s:.2f} s, {active}/{len(rows)} flows active; tc shows {sampled_filters}/{2 * len(sample)} filters on {len(sample)} sampled devices", flush=True)
        noop = []
        changes = []
        for _ in range(repeats):
            seconds, plan = timed(client.reconcile)
            noop.append(seconds)
            changes.append(len(plan.add) + len(plan.remove))
        print(f"no-op reconcile: median {benchlib.median(noop):.3f} s over {repeats} (changes made: {sum(changes)})", flush=True)
        remove_s, _ = timed(lambda: client.delete_session("cp"))
        left = sum(tc_filters_on(d) for d in sample)
        print(f"vtap session delete: {remove_s:.2f} s; filters left on sampled devices: {left}", flush=True)
    return {
        "apply_s": apply_s,
        "status_s": status_s,
        "flows_active": active,
        "flows": len(rows),
        "sampled_devices": len(sample),
        "sampled_filters_after_apply": sampled_filters,
        "sampled_filters_after_delete": left,
        "noop_reconcile_s": benchlib.median(noop),
        "noop_reconcile_runs_s": noop,
        "noop_reconcile_changes": sum(changes),
        "delete_s": remove_s,
    }


def tc_part(devices: list[str], netns: str) -> dict:
    bytecode = tc_bytecode(FILTER)
    commands = tc_commands(devices, bytecode)
    started = time.perf_counter()
    for command in commands:
        benchlib.run("tc", *command)
    per_object_s = time.perf_counter() - started
    print(f"tc, one process per object ({len(commands)} processes): {per_object_s:.2f} s", flush=True)
    check_s, found = timed(lambda: sum(tc_filters_on(d) for d in devices))
    print(f"tc check ({2 * len(devices)} `tc filter show` processes): {check_s:.2f} s, {found} filters found", flush=True)
    for device in devices:
        benchlib.run("tc", "qdisc", "del", "dev", device, "clsact")
    batch = "".join(" ".join(f'"{word}"' if " " in word else word for word in command) + "\n" for command in commands)
    batch_s, _ = timed(lambda: subprocess.run(["tc", "-batch", "-"], input=batch, text=True, check=True))
    print(f"tc -batch (one process): {batch_s:.2f} s", flush=True)
    return {"processes": len(commands), "per_object_s": per_object_s, "check_s": check_s, "check_found_filters": found, "batch_s": batch_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="no-op reconciles to time")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/control_plane.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    env = benchlib.environment()
    netns = f"vtapbcp{os.getpid()}"
    workdir = tempfile.mkdtemp(prefix="vtapbcp-")
    devices = interfaces(args.flows)
    try:
        build_s, _ = timed(lambda: build(netns, args.flows))
        print(f"{args.flows} interfaces in namespace {netns}: built in {build_s:.1f} s", flush=True)
        benchlib.enter_netns(netns)
        vtap = vtap_part(devices, workdir, args.repeats)
        tc = tc_part(devices, netns)
    finally:
        benchlib.delete_netns(netns)
        subprocess.run(["rm", "-rf", workdir])
    lines = [
        f"vtap control plane benchmark: {args.flows} flows (direction both, filter '{FILTER}') on {args.flows} interfaces, target port:mon0",
        f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        f"vtap apply                 {vtap['apply_s']:8.2f} s   target <= {TARGETS['apply_s']:g} s  {'met' if vtap['apply_s'] <= TARGETS['apply_s'] else 'NOT met'}",
        f"vtap no-op reconcile       {vtap['noop_reconcile_s']:8.3f} s   target <= {TARGETS['noop_reconcile_s']:g} s  {'met' if vtap['noop_reconcile_s'] <= TARGETS['noop_reconcile_s'] else 'NOT met'} (changes made: {vtap['noop_reconcile_changes']})",
        f"vtap status                {vtap['status_s']:8.2f} s   ({vtap['flows_active']}/{vtap['flows']} flows active)",
        f"vtap session delete        {vtap['delete_s']:8.2f} s",
        f"tc, a process per object   {tc['per_object_s']:8.2f} s   ({tc['processes']} processes)",
        f"tc check, per device/hook  {tc['check_s']:8.2f} s   ({tc['check_found_filters']} filters found)",
        f"tc -batch, one process     {tc['batch_s']:8.2f} s",
        "",
        f"apply: vtap is {tc['per_object_s'] / vtap['apply_s']:.1f}x faster than a tc process per object; no-op reconcile {tc['check_s'] / vtap['noop_reconcile_s']:.1f}x faster than tc checks",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    benchlib.save("control_plane", {"environment": env, "flows": args.flows, "filter": FILTER, "vtap": vtap, "tc": tc, "targets": TARGETS}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
