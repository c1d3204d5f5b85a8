"""Small packets through the tc mirror: 64-byte frames/s forwarded with and without a tap.

Topology as bench/datapath.py (c1 --e1/vh1-- br0 --vh2/e2-- c2 in namespace H,
mon0 -> mon1 in M counts the copies). A C sender (capture_sender.c, built with
cc) sends 64-byte frames (unicast to e2, EtherType 0x88b5) out of e1 as fast as
it goes; the bridge forwards them to e2. Figure: frames/s received by e2. The
sender, and with it the kernel's forwarding and mirroring (they run in its
context), is pinned to one CPU at nice -10, so the rate measures CPU cost per
packet. TCP benchmarks hide this cost in 64 KB GSO frames.

    no-tap              nothing mirrored
    match-nothing       a vtap flow on vh1 (both directions) whose filter matches nothing ("udp port 7")
    mirror-all          a vtap flow on vh1 (both), no filter, to port:mon0: cls_bpf (classic) + mirred
    tcx-empty           not vtap: an eBPF program on vh1's tcx hooks that returns at once (the hook's own cost)
    tcx-match-nothing   not vtap: one eBPF program on vh1's tcx hooks, "udp port 7" test + bpf_clone_redirect
    tcx-mirror-all      the same program without the test: every packet cloned to mon0
    da-empty            the empty program as a direct-action cls_bpf filter on clsact: what clsact + cls_bpf cost
    da-match-nothing    the one-step program as a direct-action cls_bpf filter on clsact (no mirred)
    da-mirror-all       likewise, cloning everything
    mirror-sink         as mirror-all (vtap), but an eBPF program on mon0's tcx egress drops every copy
    tcx-mirror-sink     as tcx-mirror-all, likewise  (these two show what the copy costs before the
                        target's receiver: mon1's receive processing also runs on this CPU; this
                        kernel has no dummy driver)

Every tap run is paired with a no-tap run right next to it (order alternating);
ratio = median of the paired ratios, with quartiles. Completeness = copies at
mon1 / frames through vh1. Targets (vtap's): match-nothing >= 0.98, mirror-all >= 0.90.

    python3 bench/small_packets.py [--rounds 12] [--seconds 1.5] [--scenarios ...] [--profile 4] [--name small_packets]   (root)

--profile: afterwards each scenario runs that many seconds under perf (bench/small_packets_profile.py)
and the report says where the extra ns per frame go.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import datapath  # noqa: E402
import onestep_bpf  # noqa: E402

SCENARIOS = ("no-tap", "match-nothing", "mirror-all", "tcx-empty", "tcx-match-nothing", "tcx-mirror-all", "da-empty", "da-match-nothing", "da-mirror-all", "mirror-sink", "tcx-mirror-sink")
MIRRORING = ("mirror-all", "tcx-mirror-all", "da-mirror-all")
VTAP = ("match-nothing", "mirror-all", "mirror-sink")
MATCH_NOTHING_PORT = 7  # "udp port 7": the benchmark's frames are not IP
TARGETS = {"match-nothing": 0.98, "mirror-all": 0.90}
FRAME_BYTES = 64
DATA_CPU = datapath.DATA_CPU
NICE = datapath.NICE
HERE = os.path.dirname(os.path.abspath(__file__))


class Topology(datapath.Topology):
    def __init__(self, workdir: str):
        tag = f"vtapbsp{os.getpid()}"
        self.host, self.c1, self.c2, self.mon = (f"{tag}-{part}" for part in ("h", "c1", "c2", "m"))
        self.sender = os.path.join(workdir, "capture_sender")

    def build(self):
        benchlib.run("cc", "-O2", "-o", self.sender, os.path.join(HERE, "capture_sender.c"))
        super().build()
        # e2 never speaks, so the bridge would flood: a static entry sends the frames to vh2 only.
        self.e2_mac = benchlib.run("ip", "-n", self.c2, "-br", "link", "show", "e2").stdout.split()[2]
        benchlib.run("bridge", "-n", self.host, "fdb", "add", self.e2_mac, "dev", "vh2", "master", "static")

    def send(self, seconds: float) -> tuple[int, float, float]:
        """(frames sent, wall seconds, CPU seconds of the sender: user + system, softirq work done in its context included)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = benchlib.run(*NICE, "ip", "netns", "exec", self.c1, self.sender, "e1", "0", str(seconds), str(FRAME_BYTES), self.e2_mac).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sent, elapsed = out.split()
        return int(sent), float(elapsed), (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


class Scenario:
    """One scenario in place on vh1 (namespace H, which this process has entered) for a `with`."""

    def __init__(self, name: str, client):
        self.name, self.client = name, client
        self.fds, self.ipr = [], None

    def __enter__(self):
        if self.name in VTAP:
            self.client.create_session("bench", to="port:mon0")
            self.client.add_flow("bench", interface="vh1", direction="both", filter="udp port 7" if self.name == "match-nothing" else None)
        elif self.name != "no-tap":
            import socket

            port = MATCH_NOTHING_PORT if self.name.endswith("match-nothing") else None
            target = None if self.name.endswith("-empty") else socket.if_nametoindex("mon0")
            prog = onestep_bpf.load(onestep_bpf.program(target, port))
            self.fds.append(prog)
            vh1 = socket.if_nametoindex("vh1")
            if self.name.startswith("tcx-"):
                self.fds += [onestep_bpf.attach_tcx(prog, vh1, hook) for hook in ("ingress", "egress")]
            else:
                from pyroute2 import IPRoute

                self.ipr = IPRoute()
                self.ipr.tc("add", "clsact", vh1)
                for hook in ("ingress", "egress"):
                    onestep_bpf.attach_cls_bpf_da(self.ipr, prog, vh1, hook)
        if self.name.endswith("-sink"):
            import socket

            sink = onestep_bpf.load(onestep_bpf.drop_program())
            self.fds += [sink, onestep_bpf.attach_tcx(sink, socket.if_nametoindex("mon0"), "egress")]
        return self

    def __exit__(self, *exc):
        if self.name in VTAP:
            self.client.delete_session("bench")
        if self.ipr is not None:
            import socket

            self.ipr.tc("del", "clsact", socket.if_nametoindex("vh1"))
            self.ipr.close()
        for fd in reversed(self.fds):  # closing a tcx link's fd detaches it
            os.close(fd)


def measure(topology: Topology, client, name: str, seconds: float) -> dict:
    with Scenario(name, client):
        time.sleep(0.2)
        src0, mon0, dst0 = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon), benchlib.link_counters("e2", topology.c2)
        sent, elapsed, cpu = topology.send(seconds)
        time.sleep(0.3)  # copies still in flight
        src1, mon1, dst1 = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon), benchlib.link_counters("e2", topology.c2)
    source = src1["rx"] - src0["rx"]
    forwarded = dst1["rx"] - dst0["rx"]
    mirrored = mon1["rx"] - mon0["rx"]  # sink rows: 0, the copies are dropped before mon0
    return {"sent": sent, "seconds": elapsed, "source_packets": source, "forwarded": forwarded, "pps": forwarded / elapsed, "cpu_seconds": cpu, "per_cpu_second": forwarded / cpu if cpu else None, "sent_pps": sent / elapsed, "mirrored_packets": mirrored, "completeness": mirrored / source if source else None}


def summarize(rows: dict) -> dict:
    summary = {}
    for name, runs in rows.items():
        ratios = [r["pps"] / r["paired_no_tap_pps"] for r in runs if "paired_no_tap_pps" in r]
        cpu_ratios = [r["per_cpu_second"] / r["paired_no_tap_per_cpu_second"] for r in runs if r.get("paired_no_tap_per_cpu_second") and r["per_cpu_second"]]
        extra_ns = [1e9 / r["per_cpu_second"] - 1e9 / r["paired_no_tap_per_cpu_second"] for r in runs if r.get("paired_no_tap_per_cpu_second") and r["per_cpu_second"]]
        summary[name] = {
            "median_pps": benchlib.median(r["pps"] for r in runs),
            "median_sent_pps": benchlib.median(r["sent_pps"] for r in runs),
            "ratio_to_no_tap": benchlib.median(ratios) if name != "no-tap" else 1.0,
            "paired_ratios": ratios,
            "ratio_quartiles": datapath._quartiles(ratios),
            "median_per_cpu_second": benchlib.median(r["per_cpu_second"] for r in runs),
            "cpu_ratio_to_no_tap": benchlib.median(cpu_ratios) if name != "no-tap" else 1.0,
            "cpu_paired_ratios": cpu_ratios,
            "cpu_ratio_quartiles": datapath._quartiles(cpu_ratios),
            "median_cpu_ns_per_frame": benchlib.median(1e9 / r["per_cpu_second"] for r in runs if r["per_cpu_second"]),
            "extra_cpu_ns_per_frame": benchlib.median(extra_ns) if name != "no-tap" else 0.0,
            "median_completeness": benchlib.median(r["completeness"] for r in runs) if name in MIRRORING else None,
            "min_completeness": min(r["completeness"] for r in runs) if name in MIRRORING else None,
            "mirrored_packets_total": sum(r["mirrored_packets"] for r in runs),
        }
    return summary


def report(summary: dict, env: dict, rounds: int, seconds: float, loads: list) -> str:
    lines = [
        f"vtap small packets: {FRAME_BYTES}-byte frames c1 -> c2 over veth + bridge as fast as a C sender goes, tap on vh1 (both directions), all on one CPU",
        f"{rounds} rounds x {seconds:g} s per run; each tap run paired with a no-tap run; ratio = median of the paired ratios (quartiles). {env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs",
        f"load average (1 min) at start {env['loadavg_at_start'][0]:.2f}, per round {' '.join(f'{x:.2f}' for x in loads)}",
        "",
        "frames/s: received by e2 per wall second; per CPU-s: per second of the sender's CPU time (the kernel's forwarding and",
        "mirroring run in its context), which time taken by other work on that CPU does not disturb; +ns/frame: median",
        "of the paired differences in the sender's CPU time per frame (no-tap: {:.0f} ns/frame)".format(summary["no-tap"]["median_cpu_ns_per_frame"]),
        "",
        f"{'scenario':<19}{'frames/s':>11}{'ratio':>8}{'quartiles':>14}{'per CPU-s':>11}{'ratio':>8}{'quartiles':>14}{'+ns/frame':>10}{'complete':>10}   target (ratio)",
    ]
    for name, s in summary.items():
        complete = f"{100 * s['median_completeness']:.2f}%" if s["median_completeness"] is not None else "-"
        spread = f"{s['ratio_quartiles'][0]:.3f}..{s['ratio_quartiles'][1]:.3f}" if s["ratio_quartiles"] else "-"
        kind = name.split("-", 1)[1] if name.startswith(("tcx-", "da-")) else name
        target = f">= {TARGETS[kind]:.2f}" + (" met" if s["ratio_to_no_tap"] >= TARGETS[kind] else " NOT met") + (" / met" if s["cpu_ratio_to_no_tap"] >= TARGETS[kind] else " / NOT met") if kind in TARGETS else ""
        cpu_spread = f"{s['cpu_ratio_quartiles'][0]:.3f}..{s['cpu_ratio_quartiles'][1]:.3f}" if s["cpu_ratio_quartiles"] else "-"
        lines.append(f"{name:<19}{s['median_pps']:>11,.0f}{s['ratio_to_no_tap']:>8.3f}{spread:>14}{s['median_per_cpu_second']:>11,.0f}{s['cpu_ratio_to_no_tap']:>8.3f}{cpu_spread:>14}{s['extra_cpu_ns_per_frame']:>10.0f}{complete:>10}   {target}")
    nothing = {n: s["mirrored_packets_total"] for n, s in summary.items() if n.endswith(("match-nothing", "empty"))}
    if nothing:
        lines.append("\ncopies made by the match-nothing taps (should be 0): " + ", ".join(f"{n} {c}" for n, c in nothing.items()))
    lines.append("tcx-* / da-*: one hand-assembled eBPF program (bench/onestep_bpf.py: filter test + bpf_clone_redirect), not vtap's data path")
    lines += [verdict(summary, kind) for kind in TARGETS if kind in summary and f"tcx-{kind}" in summary]
    return "\n".join(lines)


def verdict(summary: dict, kind: str) -> str:
    """Which form is faster for a kind of tap, by the quartiles of the per-CPU-second ratios; equal: cls_bpf + mirred stays."""
    ours, theirs = summary[kind], summary[f"tcx-{kind}"]
    (low, high), (other_low, other_high) = ours["cpu_ratio_quartiles"], theirs["cpu_ratio_quartiles"]
    figures = f"{kind} {ours['cpu_ratio_to_no_tap']:.3f} ({low:.3f}..{high:.3f}) vs tcx-{kind} {theirs['cpu_ratio_to_no_tap']:.3f} ({other_low:.3f}..{other_high:.3f})"
    if other_low > high:
        return f"{kind}: the one-step tcx program is faster: {figures}"
    if low > other_high:
        return f"{kind}: cls_bpf + mirred is faster: {figures}"
    return f"{kind}: equal within the quartiles, so vtap keeps cls_bpf + mirred: {figures}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset (no-tap is always run)")
    parser.add_argument("--name", default="small_packets", help="results file name (bench/results/NAME.json, .txt)")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="then profile each scenario this long (bench/small_packets_profile.py) and append where the ns go")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/small_packets.py needs root (network namespaces, tc, bpf)", file=sys.stderr)
        return 2
    if args.profile:
        import small_packets_profile

        if not small_packets_profile.has_perf():
            return 2
    env = benchlib.environment()
    workdir = tempfile.mkdtemp(prefix="vtapbsp-")
    topology = Topology(workdir)
    try:
        topology.build()
        benchlib.enter_netns(topology.host)
        from vtap_core.client import Client

        scenarios = tuple(n for n in SCENARIOS if n == "no-tap" or n in args.scenarios.split(","))
        rows = {name: [] for name in scenarios}
        loads = []
        with Client(driver="linux", state=os.path.join(workdir, "vtap.db"), command="bench") as client:
            topology.send(0.5)  # warm-up
            taps = scenarios[1:]
            for round_number in range(args.rounds):
                loads.append(os.getloadavg()[0])
                shift = round_number % len(taps)
                for name in taps[shift:] + taps[:shift]:
                    pair = ("no-tap", name) if round_number % 2 == 0 else (name, "no-tap")
                    result = {n: measure(topology, client, n, args.seconds) for n in pair}
                    result[name]["paired_no_tap_pps"] = result["no-tap"]["pps"]
                    result[name]["paired_no_tap_per_cpu_second"] = result["no-tap"]["per_cpu_second"]
                    for n in pair:
                        rows[n].append(result[n])
                    row, base = result[name], result["no-tap"]
                    complete = f", {100 * row['completeness']:.2f}% complete" if name in MIRRORING else f", {row['mirrored_packets']} copies"
                    print(f"round {round_number + 1} {name:<18} {row['pps']:>10,.0f} frames/s vs no-tap {base['pps']:>10,.0f} ({row['pps'] / base['pps']:.3f}); per CPU-second {row['per_cpu_second']:>10,.0f} vs {base['per_cpu_second']:>10,.0f} ({row['per_cpu_second'] / base['per_cpu_second']:.3f}){complete}", flush=True)
            profiles = profile_load = None
            if args.profile:
                import small_packets_profile

                profiles = small_packets_profile.profile_all(topology, client, scenarios, args.profile, workdir)
        summary = summarize(rows)
        text = report(summary, env, args.rounds, args.seconds, loads)
        if profiles:
            import small_packets_profile

            profile_load = os.getloadavg()[0]
            text += f"\n\nload average (1 min) at the profile's end {profile_load:.2f}; {args.profile:g} s per scenario\n" + small_packets_profile.report(profiles)
            paired = {name: s["extra_cpu_ns_per_frame"] for name, s in summary.items() if name != "no-tap"}
            text += "\n\n" + small_packets_profile.findings(profiles, summary["no-tap"]["median_cpu_ns_per_frame"], paired)
        print("\n" + text)
        benchlib.save(args.name, {"environment": env, "rounds": args.rounds, "seconds": args.seconds, "frame_bytes": FRAME_BYTES, "loadavg_per_round": loads, "summary": summary, "runs": rows, "targets": TARGETS, "profiles": profiles, "profile_loadavg_at_end": profile_load}, text)
        return 0
    finally:
        topology.destroy()
        subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    sys.exit(main())
