"""Small packets through the tc mirror: 64-byte frames/s forwarded with and without a tap.

Topology as bench/datapath.py (c1 --e1/vh1-- br0 --vh2/e2-- c2 in namespace H,
mon0 -> mon1 in M counts the copies). A C sender (capture_sender.c, built with
cc) sends 64-byte frames (unicast to e2, EtherType 0x88b5) out of e1 as fast as
it goes; the bridge forwards them to e2. Figure: frames/s received by e2. The
sender, and with it the kernel's forwarding and mirroring (they run in its
context), is pinned to one CPU (the data CPU) at nice -10, so the rate measures
CPU cost per packet. TCP benchmarks hide this cost in 64 KB GSO frames.

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

    no-tap-again        no tap either: the control. Paired with no-tap as a tap is, it must read 1.00;
                        its quartiles are how precise the rig is

How the figures are made precise (this VM shares its host; the rate of the very same path moves by
10-15 % from one 0.1 s to the next):
- The data CPU is the sender's alone (bench/cpu_isolation.py): every task and IRQ that may move is
  moved off it for the run and put back afterwards (also on Ctrl-C, SIGTERM, an exception); vtap's
  control plane, RCU callbacks of removed filters and other helpers' work run on the other CPU.
- One sender sends throughout; the scenarios change under it (a process per run starts each time
  from other memory, and its start is measured too). A pair is no-tap and a scenario taking turns
  (A B A B A B, --alternations), so that a burst on the host lasting a second or two hits both
  sides. After each change the rig waits --settle seconds, then reads 0.05 s windows: the CPU ns
  of the sender and of the data CPU's ksoftirqd (/proc/PID/schedstat: softirq work that leaves
  the sender's context still counts) against the frames e2 received (netlink).
- A window counts only when the sender + ksoftirqd ran >= 99 % of it: nothing else ran on the data
  CPU (another benchmark pinned there, say). Each side of a pair needs half its windows, else the
  pair is measured again (--retries).
- A side's figure is the upper quartile of its windows: a burst on the host only ever slows a
  window, so the upper quartile is the path's own speed; the median follows how many windows a
  burst hit. Ratio = median of the paired ratios, with quartiles (pair order alternating).
Steal time (/proc/stat) and cpufreq (none in this VM) are reported. Completeness = copies at mon1 /
frames through vh1, counted exactly once per mirroring scenario with a sender that stops
(measure()). Targets (vtap's): match-nothing >= 0.98, mirror-all >= 0.90.

    python3 bench/small_packets.py [--rounds 12] [--seconds 1.5] [--scenarios ...] [--profile 4] [--name small_packets]
        [--cpu N] [--settle 0.3] [--alternations 3] [--window 0.05] [--retries 6] [--no-isolate] [--fresh-sender]   (root)

--fresh-sender: the method before the windows (a sender per run, whole-run figures), to compare.
--profile: afterwards each scenario runs that many seconds under perf (bench/small_packets_profile.py)
and the report says where the extra ns per frame go.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import cpu_isolation  # noqa: E402
import datapath  # noqa: E402
import onestep_bpf  # noqa: E402

SCENARIOS = ("no-tap", "no-tap-again", "match-nothing", "mirror-all", "vtap-tcx-match-nothing", "vtap-tcx-mirror-all", "tcx-empty", "tcx-match-nothing", "tcx-mirror-all", "da-empty", "da-match-nothing", "da-mirror-all", "mirror-sink", "tcx-mirror-sink")
CONTROLS = ("no-tap", "no-tap-again")  # no-tap-again: no tap either, paired with no-tap like a tap: must read 1.00
MIRRORING = ("mirror-all", "vtap-tcx-mirror-all", "tcx-mirror-all", "da-mirror-all")
VTAP = ("match-nothing", "mirror-all", "mirror-sink", "vtap-tcx-match-nothing", "vtap-tcx-mirror-all")  # through vtap (vtap-tcx-: datapath=tcx)
MATCH_NOTHING_PORT = 7  # "udp port 7": the benchmark's frames are not IP
TARGETS = {"match-nothing": 0.98, "mirror-all": 0.90}
FRAME_BYTES = 64
DATA_CPU = datapath.DATA_CPU
NICE = datapath.NICE
HERE = os.path.dirname(os.path.abspath(__file__))
WARM_UP = 0.1  # seconds sent, unmeasured, before each measured run
WINDOW = 0.05  # seconds: a visit's figures come from windows this long
MIN_EXCLUSIVE = 0.5  # a visit counts when at least this share of its windows were exclusive
EXCLUSIVE = 0.99  # a run counts when sender + ksoftirqd had the data CPU this much of the sending loop's time
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Topology(datapath.Topology):
    def __init__(self, workdir: str):
        tag = f"vtapbsp{os.getpid()}"
        self.host, self.c1, self.c2, self.mon = (f"{tag}-{part}" for part in ("h", "c1", "c2", "m"))
        self.sender = os.path.join(workdir, "capture_sender")
        self.ksoftirqd = None

    def build(self):
        benchlib.run("cc", "-O2", "-o", self.sender, os.path.join(HERE, "capture_sender.c"))
        super().build()
        # e2 never speaks, so the bridge would flood: a static entry sends the frames to vh2 only.
        self.e2_mac = benchlib.run("ip", "-n", self.c2, "-br", "link", "show", "e2").stdout.split()[2]
        benchlib.run("bridge", "-n", self.host, "fdb", "add", self.e2_mac, "dev", "vh2", "master", "static")

    def send(self, seconds: float) -> tuple[int, float, float]:
        """(frames sent, wall seconds, CPU seconds of the sender: user + system, softirq work done in its context included)."""
        run = self.send_measured(seconds)
        return run["sent"], run["seconds"], run["cpu_seconds"]

    def send_measured(self, seconds: float) -> dict:
        """One run of the sender on the data CPU, and what that CPU did meanwhile.

        sent, seconds (the sender's sending loop), cpu_seconds (the sender: user + system, with
        the softirq work run in its context), ksoftirqd_seconds (the data CPU's ksoftirqd, which
        takes the receive backlog over when softirqs run too long in the sender's context),
        wall_seconds (the sender's whole life, start-up included), steal_seconds (the data CPU's,
        /proc/stat), exclusive (sender + ksoftirqd ran for >= EXCLUSIVE of the sending loop's time:
        nothing else ran on the data CPU, e.g. another benchmark pinned to it).
        """
        if self.ksoftirqd is None:
            self.ksoftirqd = cpu_isolation.ksoftirqd(int(DATA_CPU))
        soft0, steal0 = cpu_isolation.run_ns(self.ksoftirqd)[0], cpu_isolation.cpu_ticks(int(DATA_CPU))["steal"]
        start = time.monotonic()
        child = subprocess.Popen([self.sender, "e1", "0", str(seconds), str(FRAME_BYTES), self.e2_mac], stdout=subprocess.PIPE, text=True, preexec_fn=lambda: _on_data_cpu(self.c1))
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        soft1, steal1 = cpu_isolation.run_ns(self.ksoftirqd)[0], cpu_isolation.cpu_ticks(int(DATA_CPU))["steal"]
        if child.returncode:
            raise RuntimeError(f"capture_sender exited with {child.returncode}")
        sent, elapsed = out.split()
        cpu, soft = usage.ru_utime + usage.ru_stime, (soft1 - soft0) / 1e9
        return {"sent": int(sent), "seconds": float(elapsed), "cpu_seconds": cpu, "ksoftirqd_seconds": soft, "wall_seconds": wall,
                "steal_seconds": steal1 - steal0, "involuntary_switches": usage.ru_nivcsw, "exclusive": cpu + soft >= EXCLUSIVE * float(elapsed)}


def use_data_cpu(cpu: int) -> None:
    """Run the sender (and so the data path) on cpu from now on (bench/small_packets_profile.py follows)."""
    global DATA_CPU, NICE
    DATA_CPU, NICE = str(cpu), ("taskset", "-c", str(cpu), *NICE[3:])


def _on_data_cpu(netns: str) -> None:
    """In the sender's child before exec: into netns, onto the data CPU, at nice -10 (as `taskset`, `nice`, `ip netns exec`)."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {netns}")
    os.close(fd)
    os.sched_setaffinity(0, {int(DATA_CPU)})
    os.setpriority(os.PRIO_PROCESS, 0, int(NICE[-1]))


class Clients:
    """vtap as the scenarios use it: datapath tc (the default), and datapath=tcx for vtap-tcx-*."""

    def __init__(self, workdir: str):
        from vtap_core.client import Client

        self.tc = Client(driver="linux", state=os.path.join(workdir, "vtap.db"), command="bench")
        self.tcx = Client(driver="linux", state=os.path.join(workdir, "vtap.db"), command="bench", datapath="tcx")

    def for_scenario(self, name: str):
        return self.tcx if name.startswith("vtap-tcx-") else self.tc

    def close(self):
        self.tc.close()
        self.tcx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Scenario:
    """One scenario in place on vh1 (namespace H, which this process has entered) for a `with`."""

    def __init__(self, name: str, clients):
        self.name, self.client = name, clients.for_scenario(name)
        self.fds, self.ipr = [], None

    def __enter__(self):
        if self.name in VTAP:
            self.client.create_session("bench", to="port:mon0")
            self.client.add_flow("bench", interface="vh1", direction="both", filter="udp port 7" if self.name.endswith("match-nothing") else None)
        elif self.name not in CONTROLS:
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


class Sender:
    """One sender for all the visits: it sends from start to end on the data CPU while the taps change.

    A fresh process per run starts each time from other memory (other cache sets, another socket),
    which alone moved the rate by a few %; this one stays. Its windows are read while it sends:
    its CPU ns and the data CPU's ksoftirqd's (/proc/PID/schedstat), frames received by e2
    (netlink, a socket opened in e2's namespace), the wall clock.
    """

    def __init__(self, topology: Topology):
        from pyroute2 import IPRoute

        self.topology = topology
        self.ksoftirqd = cpu_isolation.ksoftirqd(int(DATA_CPU))
        benchlib.enter_netns(topology.c2)
        try:
            self.c2 = IPRoute()
        finally:
            benchlib.enter_netns(topology.host)
        self.e2 = self.c2.link_lookup(ifname="e2")[0]
        self.process = subprocess.Popen([topology.sender, "e1", "0", "1000000", str(FRAME_BYTES), topology.e2_mac], stdout=subprocess.DEVNULL, preexec_fn=lambda: _on_data_cpu(topology.c1))

    def close(self):
        self.process.kill()
        self.process.wait()
        self.c2.close()

    def _cpu_ns(self) -> int:
        return cpu_isolation.run_ns(self.process.pid)[0] + cpu_isolation.run_ns(self.ksoftirqd)[0]

    def snapshot(self) -> tuple[float, float, int]:
        """(wall s, CPU ns of sender + ksoftirqd, frames received by e2); the clocks read either side of the counter."""
        t0, c0 = time.monotonic(), self._cpu_ns()
        frames = self.c2.get_links(self.e2)[0].get_attr("IFLA_STATS64")["rx_packets"]
        c1, t1 = self._cpu_ns(), time.monotonic()
        return (t0 + t1) / 2, (c0 + c1) / 2, frames

    def visit(self, seconds: float) -> list[dict]:
        """WINDOW-long windows for `seconds`: frames per CPU second, per wall second, and the sender's share of the CPU."""
        if self.process.poll() is not None:
            raise RuntimeError(f"capture_sender exited with {self.process.returncode}")
        windows, before = [], self.snapshot()
        for _ in range(max(1, round(seconds / WINDOW))):
            time.sleep(WINDOW)  # (the sleep's wake-up runs on the other CPU: this process is not on the data CPU)
            after = self.snapshot()
            wall, cpu, frames = after[0] - before[0], (after[1] - before[1]) / 1e9, after[2] - before[2]
            windows.append({"frames": frames, "wall_seconds": wall, "cpu_seconds": cpu, "per_cpu_second": frames / cpu if cpu else 0.0, "pps": frames / wall, "share": cpu / wall})
            before = after
        return windows


def visit(sender: Sender, topology: Topology, client, name: str, seconds: float, settle: float) -> dict:
    """One scenario in place for `seconds` under the running sender: its windows and vh1's / mon1's counts."""
    with Scenario(name, client):
        # After a tap change: RCU frees the old filters, the control plane's work (on the other CPU) drains.
        time.sleep(settle)
        src0, mon0 = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon)
        windows = sender.visit(seconds)
        src1, mon1 = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon)
    return {"windows": windows, "source_packets": src1["rx"] - src0["rx"], "mirrored_packets": mon1["rx"] - mon0["rx"]}


def figures(visits: list[dict]) -> dict:
    """A scenario's figures from its visits in one pair: the upper quartile of the exclusive windows
    (those where nothing else ran on the data CPU). What the host's other tenants do only ever slows
    a window down, so the upper quartile is the path's own speed, steadier than the median (which
    follows how many windows a burst on the host hit)."""
    windows = [w for v in visits for w in v["windows"]]
    kept = [w for w in windows if w["share"] >= EXCLUSIVE]
    upper = (lambda values: statistics.quantiles(values, n=4)[2]) if len(kept) >= 2 else benchlib.median
    source, mirrored = sum(v["source_packets"] for v in visits), sum(v["mirrored_packets"] for v in visits)
    return {
        "visits": len(visits), "windows": len(windows), "exclusive_windows": len(kept), "exclusive": len(kept) >= MIN_EXCLUSIVE * len(windows),
        "pps": upper([w["pps"] for w in kept]) if kept else None, "per_cpu_second": upper([w["per_cpu_second"] for w in kept]) if kept else None,
        "median_pps": benchlib.median(w["pps"] for w in kept), "median_per_cpu_second": benchlib.median(w["per_cpu_second"] for w in kept),
        "share": benchlib.median(w["share"] for w in windows), "source_packets": source, "mirrored_packets": mirrored,
        # approximate: read while frames flow (the copies of the last ms before the reading count in the next visit)
        "completeness": mirrored / source if source else None,
    }


def measure(topology: Topology, client, name: str, seconds: float, settle: float = 0.2) -> dict:
    """One run of a sender of its own with the scenario in place (--fresh-sender; the exact completeness check)."""
    with Scenario(name, client):
        # After a tap change: RCU frees the old filters, the control plane's work drains; then a short send
        # warms the path (caches, slabs) so that the measured run starts where the previous one was.
        time.sleep(settle)
        topology.send_measured(WARM_UP)
        src0, mon0, dst0 = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon), benchlib.link_counters("e2", topology.c2)
        run = topology.send_measured(seconds)
        time.sleep(0.3)  # copies still in flight
        src1, mon1, dst1 = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon), benchlib.link_counters("e2", topology.c2)
    source = src1["rx"] - src0["rx"]
    forwarded = dst1["rx"] - dst0["rx"]
    mirrored = mon1["rx"] - mon0["rx"]  # sink rows: 0, the copies are dropped before mon0
    cpu = run["cpu_seconds"] + run["ksoftirqd_seconds"]
    return {**run, "source_packets": source, "forwarded": forwarded, "pps": forwarded / run["seconds"], "per_cpu_second": forwarded / cpu if cpu else None, "sent_pps": run["sent"] / run["seconds"], "mirrored_packets": mirrored, "completeness": mirrored / source if source else None}


def cpufreq(cpu: int) -> str:
    path = f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq"
    if not os.path.exists(path):
        return "none in this VM (the host sets the clock; a burst there shows as slow windows)"
    with open(path) as f:
        return f"{int(f.read()) / 1000:.0f} MHz at the start"


def summarize(rows: dict, checks: dict | None = None, redone: dict | None = None) -> dict:
    """checks: {mirroring scenario: measure()'s exact run} for completeness; redone: {scenario: pairs measured again}."""
    checks, redone = checks or {}, redone or {}
    summary = {}
    for name, runs in rows.items():
        if not runs:
            continue
        complete = [checks[name]["completeness"]] if name in checks else [r["completeness"] for r in runs]
        ratios = [r["pps"] / r["paired_no_tap_pps"] for r in runs if "paired_no_tap_pps" in r]
        cpu_ratios = [r["per_cpu_second"] / r["paired_no_tap_per_cpu_second"] for r in runs if r.get("paired_no_tap_per_cpu_second") and r["per_cpu_second"]]
        extra_ns = [1e9 / r["per_cpu_second"] - 1e9 / r["paired_no_tap_per_cpu_second"] for r in runs if r.get("paired_no_tap_per_cpu_second") and r["per_cpu_second"]]
        summary[name] = {
            "median_pps": benchlib.median(r["pps"] for r in runs),
            "ratio_to_no_tap": benchlib.median(ratios) if name != "no-tap" else 1.0,
            "paired_ratios": ratios,
            "ratio_quartiles": datapath._quartiles(ratios),
            "median_per_cpu_second": benchlib.median(r["per_cpu_second"] for r in runs),
            "cpu_ratio_to_no_tap": benchlib.median(cpu_ratios) if name != "no-tap" else 1.0,
            "cpu_paired_ratios": cpu_ratios,
            "cpu_ratio_quartiles": datapath._quartiles(cpu_ratios),
            "median_cpu_ns_per_frame": benchlib.median(1e9 / r["per_cpu_second"] for r in runs if r["per_cpu_second"]),
            "extra_cpu_ns_per_frame": benchlib.median(extra_ns) if name != "no-tap" else 0.0,
            "median_completeness": benchlib.median(complete) if name in MIRRORING else None,
            "min_completeness": min(complete) if name in MIRRORING else None,
            "pairs_redone": redone.get(name, 0),
            "exclusive_windows": sum(r.get("exclusive_windows", 0) for r in runs),
            "windows": sum(r.get("windows", 0) for r in runs),
            "mirrored_packets_total": sum(r["mirrored_packets"] for r in runs),
        }
    return summary


def report(summary: dict, env: dict, rounds: int, seconds: float, loads: list, rig: dict | None = None) -> str:
    rig = rig or {}
    lines = [
        f"vtap small packets: {FRAME_BYTES}-byte frames c1 -> c2 over veth + bridge as fast as a C sender goes, tap on vh1 (both directions), all on one CPU",
        f"{rounds} rounds; in each, every scenario is paired with no-tap: {seconds:g} s of each" + (f", in {rig['alternations']} turns of {seconds / rig['alternations']:g} s taken alternately (A B A B ...)" if rig.get("alternations", 1) > 1 else "")
        + f", pair order alternating; one sender sending throughout; {env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs",
        f"load average (1 min) at start {env['loadavg_at_start'][0]:.2f}, per round {' '.join(f'{x:.2f}' for x in loads)}",
    ]
    if rig:
        lines += [
            f"data CPU {rig['cpu']}: " + (f"{rig['threads_moved']} threads and {rig['irqs_moved']} IRQs moved off it for the run, then back" if rig["isolated"] else "not isolated (--no-isolate)")
            + f"; steal time on it {rig['steal_seconds']:.2f} s in {rig['seconds']:.0f} s; cpufreq: {rig['cpufreq']}",
            f"a turn: {rig['settle']:g} s to settle after the tap change, then {WINDOW:g} s windows; a window counts when the sender + ksoftirqd/{rig['cpu']} ran >= {EXCLUSIVE:.0%} of it",
            f"(nothing else on the data CPU), {sum(s['exclusive_windows'] for s in summary.values()):,} of {sum(s['windows'] for s in summary.values()):,} did; a pair counts when each side has >= {MIN_EXCLUSIVE:.0%} of its windows, else it is measured again"
            + f" ({sum(s['pairs_redone'] for s in summary.values())} pairs were)",
            "a side's figure: the upper quartile of its windows (the host's other tenants only ever slow a window down); ratio = median of the paired ratios (quartiles)",
        ]
    lines += [
        "",
        "frames/s: received by e2 per wall second; per CPU-s: per second of the data CPU's time spent by the sender and its ksoftirqd",
        "(the kernel's forwarding and mirroring run there); +ns/frame: median of the paired differences in CPU time per frame",
        "(no-tap: {:.0f} ns/frame); no-tap-again: no tap either, paired with no-tap as a tap is: what the rig reads for equal paths".format(summary["no-tap"]["median_cpu_ns_per_frame"]),
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
    lines += targets(summary)
    return "\n".join(lines)


def targets(summary: dict) -> list[str]:
    """By how much each form misses (or meets) its target: in ratio, and in CPU ns per frame against the budget."""
    base = summary["no-tap"]["median_cpu_ns_per_frame"]
    lines = [f"targets (per CPU-s ratio; the budget is the extra ns/frame the target allows over no-tap's {base:.0f}):"]
    for kind, target in TARGETS.items():
        budget = base * (1 / target - 1)
        for name in (kind, f"tcx-{kind}", f"da-{kind}"):
            if name in summary:
                s = summary[name]
                low, high = s["cpu_ratio_quartiles"] or (s["cpu_ratio_to_no_tap"],) * 2
                gap = target - s["cpu_ratio_to_no_tap"]
                state = f"missed by {gap:.3f}" if gap > 0 else f"met by {-gap:.3f}"
                lines.append(f"  {name:<18} {s['cpu_ratio_to_no_tap']:.3f} ({low:.3f}..{high:.3f}) vs >= {target:.2f}: {state}; +{s['extra_cpu_ns_per_frame']:.0f} ns/frame against a budget of {budget:.0f}")
    return lines


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
    parser.add_argument("--cpu", type=int, default=int(DATA_CPU), help=f"the data CPU: sender, forwarding and mirroring run there (default {DATA_CPU}, as bench/datapath.py)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", help="leave other tasks and IRQs on the data CPU (by default they move off it for the run and come back after)")
    parser.add_argument("--alternations", type=int, default=3, help="a pair's --seconds split into this many visits of each, alternating (default 3)")
    parser.add_argument("--settle", type=float, default=0.3, metavar="SECONDS", help="wait after each tap change before measuring (default 0.3)")
    parser.add_argument("--window", type=float, default=WINDOW, metavar="SECONDS", help=f"length of a visit's windows (default {WINDOW:g})")
    parser.add_argument("--fresh-sender", action="store_true", help="a new sender process per measured run, whole-run figures (the method before the windows; to compare)")
    parser.add_argument("--retries", type=int, default=6, help="times a pair is measured again when the data CPU was not the sender's alone in one of its visits (default 6; 0: every pair counts, as before)")
    args = parser.parse_args()
    use_data_cpu(args.cpu)
    globals()["WINDOW"] = args.window
    if os.geteuid() != 0:
        print("bench/small_packets.py needs root (network namespaces, tc, bpf)", file=sys.stderr)
        return 2
    if args.profile:
        import small_packets_profile

        if not small_packets_profile.has_perf():
            return 2
        small_packets_profile.small_packets.use_data_cpu(args.cpu)  # that module's copy of this one (run as __main__)
    env = benchlib.environment()
    workdir = tempfile.mkdtemp(prefix="vtapbsp-")
    topology = Topology(workdir)
    try:
        topology.build()
        benchlib.enter_netns(topology.host)
        scenarios = tuple(n for n in SCENARIOS if n == "no-tap" or n in args.scenarios.split(","))
        rows = {name: [] for name in scenarios}
        redone = {name: 0 for name in scenarios}
        skipped = {name: 0 for name in scenarios}
        checks = {}
        loads = []
        isolation = cpu_isolation.Isolated(int(DATA_CPU)) if args.isolate else contextlib.nullcontext()
        with Clients(workdir) as client, isolation as isolated:
            if isolated:
                print(f"data CPU {DATA_CPU}: {len(isolated.tasks)} threads and {isolated.moved_irqs} IRQs moved off it for the run", flush=True)
            rig = {"cpu": int(DATA_CPU), "isolated": bool(isolated), "threads_moved": len(isolated.tasks) if isolated else 0, "irqs_moved": isolated.moved_irqs if isolated else 0,
                   "settle": args.settle, "alternations": 1 if args.fresh_sender else args.alternations, "cpufreq": cpufreq(int(DATA_CPU))}
            steal, started = cpu_isolation.cpu_ticks(int(DATA_CPU))["steal"], time.monotonic()
            topology.send(0.5)  # warm-up
            taps = scenarios[1:]
            sender = None if args.fresh_sender else Sender(topology)
            try:
                for round_number in range(args.rounds):
                    loads.append(os.getloadavg()[0])
                    shift = round_number % len(taps)
                    for name in taps[shift:] + taps[:shift]:
                        pair = ("no-tap", name) if round_number % 2 == 0 else (name, "no-tap")
                        for attempt in range(args.retries + 1):
                            if args.fresh_sender:  # as before: a sender of its own per measured run
                                result = {n: measure(topology, client, n, args.seconds, args.settle) for n in pair}
                            else:  # A B A B ...: a burst on the host that lasts a second or two hits both
                                visits = {n: [] for n in pair}
                                for _ in range(args.alternations):
                                    for n in pair:
                                        visits[n].append(visit(sender, topology, client, n, args.seconds / args.alternations, args.settle))
                                result = {n: figures(visits[n]) for n in pair}
                            shared = [n for n in pair if not result[n]["exclusive"]]
                            if not shared or not args.retries:
                                break
                            redone[name] += 1
                            shares = ", ".join(f"{n} {result[n].get('exclusive_windows', 0)} of {result[n].get('windows', 1)}" for n in shared)
                            print(f"round {round_number + 1} {name:<18} again: the data CPU was not the sender's alone in too many windows ({shares} exclusive)", flush=True)
                        else:
                            print(f"round {round_number + 1} {name:<18} skipped: never exclusive in {args.retries + 1} tries", flush=True)
                            skipped[name] += 1
                            continue
                        result[name]["paired_no_tap_pps"] = result["no-tap"]["pps"]
                        result[name]["paired_no_tap_per_cpu_second"] = result["no-tap"]["per_cpu_second"]
                        for n in pair:
                            rows[n].append(result[n])
                        row, base = result[name], result["no-tap"]
                        complete = f", {100 * row['completeness']:.2f}% complete" if name in MIRRORING else f", {row['mirrored_packets']} copies"
                        print(f"round {round_number + 1} {name:<18} {row['pps']:>10,.0f} frames/s vs no-tap {base['pps']:>10,.0f} ({row['pps'] / base['pps']:.3f}); per CPU-second {row['per_cpu_second']:>10,.0f} vs {base['per_cpu_second']:>10,.0f} ({row['per_cpu_second'] / base['per_cpu_second']:.3f}){complete}", flush=True)
                rig.update(steal_seconds=cpu_isolation.cpu_ticks(int(DATA_CPU))["steal"] - steal, seconds=time.monotonic() - started)
                profiles = profile_load = None
                if args.profile:
                    import small_packets_profile

                    profiles = small_packets_profile.profile_all(topology, client, tuple(n for n in scenarios if n != "no-tap-again"), args.profile, workdir, None if args.fresh_sender else sender, args.settle)
                    profile_load = os.getloadavg()[0]
            finally:
                if sender:
                    sender.close()
            # Completeness, exactly: a sender that stops, then every copy counted (the visits read counters while frames flow).
            for name in scenarios:
                if name in MIRRORING:
                    checks[name] = measure(topology, client, name, 0.5, args.settle)
        summary = summarize(rows, checks, redone)
        text = report(summary, env, args.rounds, args.seconds, loads, rig)
        if profiles:
            import small_packets_profile

            text += f"\n\nload average (1 min) at the profile's end {profile_load:.2f}; {args.profile:g} s per scenario\n" + small_packets_profile.report(profiles)
            paired = {name: s["extra_cpu_ns_per_frame"] for name, s in summary.items() if name != "no-tap"}
            text += "\n\n" + small_packets_profile.findings(profiles, summary["no-tap"]["median_cpu_ns_per_frame"], paired)
        print("\n" + text)
        benchlib.save(args.name, {"environment": env, "rounds": args.rounds, "seconds": args.seconds, "frame_bytes": FRAME_BYTES, "loadavg_per_round": loads, "summary": summary, "runs": rows, "completeness_checks": checks, "rig": rig, "pairs_skipped": skipped, "targets": TARGETS, "profiles": profiles, "profile_loadavg_at_end": profile_load}, text)
        return 0
    finally:
        topology.destroy()
        subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    sys.exit(main())
