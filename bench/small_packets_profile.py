"""Where the ns per frame go: kernel profiles of bench/small_packets.py's scenarios.

For each scenario the sender runs for a while under `perf record -g`, which
follows that process alone (cpu-clock sampling: this VM has no hardware
counters). Samples are kept for the sender's command only (the kernel's forwarding and mirroring run
in its context) and turned into CPU ns per forwarded frame:
samples x sampling period / frames received by e2. Under small_packets.py (one sender throughout)
perf attaches to that sender, each scenario's profile is paired with a no-tap profile taken right
next to it, and a function's ns/frame = its share of the samples x the sender's CPU ns per frame
(/proc/PID/schedstat over the same time). Each row's figure is
absolute, so scenarios compare by subtraction, which is what the report does:
per kernel function ("self" time) and per area (a function and what it calls,
perf's "children" time, for a few named entry points), the extra ns/frame of
a scenario over no-tap.

cpu-clock samples cannot fire where interrupts are off; such time lands on
the instruction that turns them back on (e.g. _raw_spin_unlock_irqrestore).

    python3 bench/small_packets_profile.py [--seconds 4] [--scenarios match-nothing,mirror-all,...]   (root)
    python3 bench/small_packets.py --profile ...   (the same, appended to that bench's output)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import cpu_isolation  # noqa: E402
import small_packets  # noqa: E402

FREQUENCY = 4000  # samples per second of CPU
SENDER = "capture_sender"
# Entry points whose "children" time (the function and all it calls) names an area of the path.
AREAS = (
    ("tc_run", "tc (clsact): classifiers and actions, all of it"),
    ("cls_bpf_classify", "  cls_bpf: program run (+ mirred, which it calls)"),
    ("tcf_mirred_act", "    mirred: clone + transmit of the copy"),
    ("skb_clone", "      skb_clone"),
    ("bpf_clone_redirect", "bpf_clone_redirect (tcx-*, da-*): clone + transmit of the copy"),
    ("process_backlog", "receive backlog (e1->vh1, vh2->e2, the copies at mon1)"),
    ("br_handle_frame", "bridge"),
    ("__dev_queue_xmit", "__dev_queue_xmit (all transmits, with the softirqs they run)"),
    ("veth_xmit", "veth_xmit (e1, vh2, mon0)"),
)
THUNKS = ("__x86_indirect_thunk_", "srso_", "retbleed_return_thunk")  # retpolines; AMD's "Safe RET" return thunk
SHOWN = 14  # functions listed per scenario


def record(topology, client, name: str, seconds: float, workdir: str, sender=None, settle: float = 0.5) -> dict:
    """One scenario's profile: {'frames', 'samples', 'self': {sym: ns/frame}, 'children': {sym: ns/frame}}.

    sender: small_packets.Sender, already sending: perf attaches to it for `seconds` while the scenario
    is in place (the same process for every scenario, as the paired figures); else a sender of its own.
    """
    data = os.path.join(workdir, f"perf-{name}.data")
    with small_packets.Scenario(name, client):
        time.sleep(settle if sender else 0.2)
        vh1 = benchlib.link_counters("vh1")
        cpu_ns = None
        if sender:
            before = sender.snapshot()
            benchlib.run("perf", "record", "-q", "-g", "-F", str(FREQUENCY), "-o", data, "-p", str(sender.process.pid), "--", "sleep", str(seconds))
            after = sender.snapshot()
            # perf samples only part of this (it starts and stops inside it): the samples give the shares,
            # the sender's CPU ns per frame over the whole of it gives the scale.
            frames, cpu_ns = after[2] - before[2], after[1] - before[1]
        else:
            before = benchlib.link_counters("e2", topology.c2)["rx"]
            # perf follows the sender (and what runs in its context) wherever it is, and nothing else.
            benchlib.run("perf", "record", "-q", "-g", "-F", str(FREQUENCY), "-o", data, "--", *small_packets.NICE, "ip", "netns", "exec", topology.c1, topology.sender, "e1", "0", str(seconds), str(small_packets.FRAME_BYTES), topology.e2_mac)
            time.sleep(0.2)
            frames = benchlib.link_counters("e2", topology.c2)["rx"] - before
        vh1_after = benchlib.link_counters("vh1")
    ns_per_sample = 1e9 / FREQUENCY
    own, total = _report(data, children=False)
    with_callees, _ = _report(data, children=True)
    os.unlink(data)
    scale = ns_per_sample / frames if frames else 0.0
    if cpu_ns is not None and frames and total:
        scale = cpu_ns / frames / total
    return {
        "frames": frames,
        # Which of vh1's hooks the frames cross: its ingress (received) and egress (sent) hook.
        "vh1_received": vh1_after["rx"] - vh1["rx"],
        "vh1_sent": vh1_after["tx"] - vh1["tx"],
        "samples": total,
        "ns_per_frame": total * scale,
        "self": {sym: n * scale for sym, n in own.items()},
        "children": {sym: n * scale for sym, n in with_callees.items() if sym in dict(AREAS)},
        # Classic BPF's JIT images (cls_bpf from ops) have no kallsyms name: perf shows their address (0xffffffffc...).
        "programs": sum(n for sym, n in own.items() if sym.startswith("bpf_prog_") or sym.startswith("0xffffffffc")) * scale,
        "thunks": sum(n for sym, n in own.items() if sym.startswith(THUNKS)) * scale,
    }


def _report(data: str, children: bool) -> tuple[dict, int]:
    """{symbol: samples} of the sender's samples (its own, or with its callees'), and the sender's total.

    Children counts come as percentages (relative to the sender's samples) and are turned back into samples.
    """
    own = _perf_report(data, "--no-children", "sample,sym")
    found, total = {}, 0
    for line in own:
        match = re.match(r"^\s+(\d+)\s+\[[.kKuUgGH]\]\s+(\S+)", line)
        if match:
            found[match.group(2)] = found.get(match.group(2), 0) + int(match.group(1))
            total += int(match.group(1))
    if not children:
        return found, total
    found = {}
    for line in _perf_report(data, "--children", "overhead_children,sym"):
        match = re.match(r"^\s+([\d.]+)%\s+\[[.kKuUgGH]\]\s+(\S+)", line)
        if match:
            found[match.group(2)] = found.get(match.group(2), 0) + float(match.group(1)) * total / 100
    return found, total


def _perf_report(data: str, mode: str, fields: str) -> list[str]:
    return benchlib.run("perf", "report", "-i", data, "--stdio", mode, "--comms", SENDER, "--percentage", "relative", "--sort", "sym", "-g", "none", "--percent-limit", "0", "-F", fields, check=False).stdout.splitlines()


def report(profiles: dict) -> str:
    base = profiles.get("no-tap")
    lines = [
        f"kernel profile (perf record -g -F {FREQUENCY} of the sender, cpu-clock; samples of {SENDER} only) as CPU ns per forwarded frame",
        "scenario             frames   ns/frame" + ("   +ns vs no-tap" if base else ""),
    ]
    for name, p in profiles.items():
        extra = f"{p['ns_per_frame'] - p.get('paired_no_tap', base)['ns_per_frame']:>+14.0f}" if base else ""
        lines.append(f"{name:<19}{p['frames']:>9,}{p['ns_per_frame']:>11.0f}{extra}")
    if base:
        for name, p in profiles.items():
            if name == "no-tap":
                continue
            base = p.get("paired_no_tap", profiles["no-tap"])
            lines.append(f"\n{name}: where the extra ns/frame go (vs " + ("the no-tap profile taken next to it)" if "paired_no_tap" in p else "no-tap)"))
            lines.append("  area (a function and its callees)                          no-tap    this   extra")
            for sym, label in AREAS:
                a, b = base["children"].get(sym, 0.0), p["children"].get(sym, 0.0)
                if a >= 0.5 or b >= 0.5:
                    lines.append(f"  {label + ' [' + sym + ']':<58}{a:>7.0f}{b:>8.0f}{b - a:>+8.0f}")
            deltas = sorted(((p["self"].get(s, 0.0) - base["self"].get(s, 0.0), s) for s in set(p["self"]) | set(base["self"])), reverse=True)
            lines.append(f"  {'BPF programs, JIT images (self) [bpf_prog_*]':<58}{base['programs']:>7.0f}{p['programs']:>8.0f}{p['programs'] - base['programs']:>+8.0f}")
            lines.append(f"  {'retpoline + Safe RET thunks (self)':<58}{base['thunks']:>7.0f}{p['thunks']:>8.0f}{p['thunks'] - base['thunks']:>+8.0f}")
            lines.append("  functions (self time), largest increases:")
            for delta, sym in deltas[:SHOWN]:
                lines.append(f"    {sym:<52}{base['self'].get(sym, 0.0):>7.1f}{p['self'].get(sym, 0.0):>8.1f}{delta:>+8.1f}")
    return "\n".join(lines)


def findings(profiles: dict, no_tap_ns: float, paired: dict | None = None) -> str:
    """What the profiles say, in figures: where match-nothing's and mirror-all's extra ns go.

    no_tap_ns: the sender's CPU ns per frame with no tap (the paired bench's figure), which turns the
    targets into budgets: ratio r allows no_tap_ns * (1/r - 1) extra ns per frame.
    paired: {scenario: extra CPU ns per frame} of small_packets.py's paired runs, where there are some:
    differences between whole scenarios are steadier there than between two profiles' totals.
    """
    paired = paired or {}
    def children(name, sym):
        return profiles[name]["children"].get(sym, 0.0) if name in profiles else None

    def own(name, sym):
        return profiles[name]["self"].get(sym, 0.0) if name in profiles else None

    lines = [f"findings (from the profile above; budgets from no-tap's {no_tap_ns:.0f} ns/frame: ratio 0.98 allows {no_tap_ns * (1 / 0.98 - 1):.0f} extra ns/frame, 0.90 allows {no_tap_ns * (1 / 0.90 - 1):.0f})"]
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        lines.append(f"- kernel.bpf_stats_enabled = {f.read().strip()} (1 would time every program run)")
    crossed = [(n, p["vh1_received"], p["vh1_sent"]) for n, p in profiles.items() if n != "no-tap"]
    if crossed:
        sent = max(c[2] for c in crossed)
        lines.append(f"- the frames cross one hook of vh1 only: received {min(c[1] for c in crossed):,}+ per run at its ingress, at most {sent:,} sent through its egress, so a flow of direction both runs one program per frame, not two")
    if "match-nothing" in profiles:
        tc, program = children("match-nothing", "tc_run"), profiles["match-nothing"]["programs"]
        layers = ", ".join(f"{sym} {own('match-nothing', sym):.0f}" for sym in ("tc_run", "tcf_classify", "__tcf_classify.constprop.0", "cls_bpf_classify"))
        lines.append(f"- match-nothing (cls_bpf): the clsact/tc path costs {tc:.0f} ns/frame, of which the filter program itself (JIT image) {program:.0f}; the rest is tc's layers around it (self ns: {layers}), each a call and a return through this kernel's retpoline and Safe RET (spec_rstack_overflow) thunks ({profiles['match-nothing']['thunks']:.0f} ns in the thunks themselves)")
    if "tcx-match-nothing" in profiles:
        p = profiles["tcx-match-nothing"]
        empty = f"; tcx-empty's program {profiles['tcx-empty']['programs']:.0f}" if "tcx-empty" in profiles else ""
        lines.append(f"- tcx-match-nothing: the program costs {p['programs']:.0f} ns (its LD_ABS loads are helper calls in eBPF; classic BPF's are inlined){empty}; tcx's hook checks have no function of their own (inlined, see below)")
    if "da-empty" in profiles and "tcx-empty" in profiles:
        also = f" (paired runs: +{paired['da-empty']:.0f} and +{paired['tcx-empty']:.0f} ns/frame over no-tap)" if "da-empty" in paired and "tcx-empty" in paired else ""
        lines.append(f"- the same empty program (return at once) costs {children('da-empty', 'tc_run'):.0f} ns/frame as a cls_bpf filter on clsact (da-empty; program {profiles['da-empty']['programs']:.0f}) and {children('tcx-empty', 'tc_run') + profiles['tcx-empty']['programs']:.0f} on tcx (tcx-empty){also}: what a tap costs before its filter test is clsact + cls_bpf, not the test")
    for name in ("match-nothing", "tcx-empty", "tcx-match-nothing", "da-empty"):
        if name in profiles and name in paired:
            p = profiles[name]
            base = p.get("paired_no_tap", profiles.get("no-tap"))
            def grew(sym):
                return p["self"].get(sym, 0.0) - base["self"].get(sym, 0.0)
            hook = children(name, "tc_run") + p["programs"]
            inline = grew("__netif_receive_skb_core.constprop.0") + grew("__dev_queue_xmit")
            lines.append(f"- {name}: +{paired[name]:.0f} ns/frame in the paired runs; the profile finds tc_run + the program {hook:.0f} and {inline:+.0f} in the own time of "
                         f"__netif_receive_skb_core + __dev_queue_xmit (the hook checks are inlined there; vs the no-tap profile next to it); the other {paired[name] - hook - inline:.0f} in no one place "
                         "(a profile's total moves by more than that from run to run: the paired runs measure the total, the profile where it goes)")
    if "mirror-all" in profiles:
        lines.append(f"- mirror-all (cls_bpf + mirred): tc path {children('mirror-all', 'tc_run'):.0f} ns/frame, of it mirred {children('mirror-all', 'tcf_mirred_act'):.0f} (skb_clone {children('mirror-all', 'skb_clone'):.0f}, the rest the copy's dev_queue_xmit into mon0: veth_xmit, enqueue to the backlog)")
    if "mirror-all" in paired and "mirror-sink" in paired:
        lines.append(f"- the target's side: mirror-all costs {paired['mirror-all'] - paired['mirror-sink']:.0f} ns/frame more than mirror-sink in the paired runs (+{paired['mirror-all']:.0f} vs +{paired['mirror-sink']:.0f}), where the copies are dropped at mon0's egress instead of crossing the veth to mon1: the copy's receive at mon1 runs on the sender's CPU too (veth has no queue of its own)")
    elif "mirror-all" in profiles and "mirror-sink" in profiles:
        receive = children("mirror-all", "process_backlog") - children("mirror-sink", "process_backlog")
        lines.append(f"- the target's side: the receive backlog runs {receive:.0f} ns/frame more with mon1 receiving the copies (mirror-all) than with them dropped at mon0 (mirror-sink): the copy's receive at mon1 runs on the sender's CPU too (veth has no queue of its own)")
    if "tcx-mirror-all" in profiles:
        redirect, mirred = children("tcx-mirror-all", "bpf_clone_redirect"), children("mirror-all", "tcf_mirred_act")
        than = "" if mirred is None else (f", {'more' if redirect > mirred else 'less'} than mirred's clone + transmit ({mirred:.0f})")
        lines.append(f"- tcx-mirror-all: bpf_clone_redirect {redirect:.0f} ns/frame{than}; it also makes the original's head writable after cloning it (pskb_expand_head {own('tcx-mirror-all', 'pskb_expand_head'):.0f} ns: a copy of the frame's data), which mirred does not")
    if "da-empty" in profiles and "mirror-all" in profiles:
        floor, copy = children("da-empty", "tc_run"), children("mirror-all", "tcf_mirred_act")
        match_budget, mirror_budget = no_tap_ns * (1 / 0.98 - 1), no_tap_ns * (1 / 0.90 - 1)
        lines.append(f"- so: match-nothing's budget ({match_budget:.0f} ns) is {'below' if floor > match_budget else 'above'} what clsact + cls_bpf cost with an empty program (~{floor:.0f}, profile); "
                     f"mirror-all's ({mirror_budget:.0f} ns) is {'below' if copy > mirror_budget else 'above'} mirred's clone + transmit alone (~{copy:.0f}), before the target receives the copy")
        if "tcx-empty" in paired and "mirror-sink" in paired:
            lines.append(f"- and in the paired runs: an empty program on tcx costs +{paired['tcx-empty']:.0f} ns/frame ({'over' if paired['tcx-empty'] > match_budget else 'within'} the {match_budget:.0f} ns budget of 0.98); "
                         f"a copy dropped before the target's receive costs +{paired['mirror-sink']:.0f} ({'over' if paired['mirror-sink'] > mirror_budget else 'within'} the {mirror_budget:.0f} ns of 0.90)")
    return "\n".join(lines)


def _no_tap_ns(profiles: dict) -> float:
    """No-tap's CPU ns per frame from the last paired run of small_packets.py (steadier than one profile), else this profile's."""
    try:
        with open(os.path.join(benchlib.RESULTS, "small_packets.json")) as f:
            return json.load(f)["summary"]["no-tap"]["median_cpu_ns_per_frame"]
    except (OSError, KeyError, ValueError):
        return profiles["no-tap"]["ns_per_frame"]


def has_perf() -> bool:
    if shutil.which("perf"):
        return True
    print("perf is not installed (Debian: apt-get install linux-perf); the profile needs it", file=sys.stderr)
    return False


def profile_all(topology, client, scenarios, seconds: float, workdir: str, sender=None, settle: float = 0.5) -> dict:
    """{scenario: profile}; with a running sender each scenario's profile is paired with a no-tap
    profile taken right next to it ('paired_no_tap'), which the report subtracts."""
    if sender is None:
        return {name: record(topology, client, name, seconds, workdir) for name in scenarios}
    profiles = {}
    for index, name in enumerate(n for n in scenarios if n != "no-tap"):
        pair = ("no-tap", name) if index % 2 == 0 else (name, "no-tap")
        taken = {n: record(topology, client, n, seconds, workdir, sender, settle) for n in pair}
        profiles[name] = {**taken[name], "paired_no_tap": taken["no-tap"]}
        profiles.setdefault("no-tap", taken["no-tap"])
    return {"no-tap": profiles.pop("no-tap"), **profiles} if "no-tap" in profiles else profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--scenarios", default="match-nothing,mirror-all,mirror-sink,tcx-empty,da-empty,tcx-match-nothing,tcx-mirror-all,tcx-mirror-sink")
    parser.add_argument("--cpu", type=int, default=int(small_packets.DATA_CPU), help="the data CPU (as small_packets.py)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", help="leave other tasks and IRQs on the data CPU")
    args = parser.parse_args()
    small_packets.use_data_cpu(args.cpu)
    if os.geteuid() != 0:
        print("bench/small_packets_profile.py needs root (network namespaces, tc, bpf, perf)", file=sys.stderr)
        return 2
    if not has_perf():
        return 2
    env = benchlib.environment()
    workdir = tempfile.mkdtemp(prefix="vtapbsp-")
    topology = small_packets.Topology(workdir)
    try:
        topology.build()
        benchlib.enter_netns(topology.host)
        scenarios = ("no-tap",) + tuple(n for n in args.scenarios.split(",") if n and n != "no-tap")
        isolation = cpu_isolation.Isolated(args.cpu) if args.isolate else contextlib.nullcontext()
        with small_packets.Clients(workdir) as client, isolation:
            topology.send(0.5)  # warm-up
            profiles = profile_all(topology, client, scenarios, args.seconds, workdir)
        text = f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, load average {env['loadavg_at_start'][0]:.2f}, {args.seconds:g} s per scenario\n" + report(profiles) + "\n\n" + findings(profiles, _no_tap_ns(profiles))
        print(text)
        benchlib.save("small_packets_profile", {"environment": env, "seconds": args.seconds, "frequency": FREQUENCY, "profiles": profiles}, text)
        return 0
    finally:
        topology.destroy()
        subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    sys.exit(main())
