"""Data path cost: TCP throughput between two "VMs" with and without a tap, in one run.

    c1 (10.99.0.1) --e1/vh1--+                      mon0 ---- mon1 (namespace M, counts arrivals)
                             br0  (namespace H: vtap works here)
    c2 (10.99.0.2) --e2/vh2--+

iperf3 runs from c1 to c2 through the bridge. The tap source is vh1, the
host-side end of c1 (what vnetN is for a KVM guest), both directions.
Scenarios (every tap run is paired with a no-tap run right next to it, so the
ratio is measured under the same machine load; pairs alternate their order):

    no-tap          nothing mirrored
    match-nothing   a vtap flow whose filter matches no packet ("udp port 7")
    mirror-all      a vtap flow without filter, to port:mon0
    relay           no vtap; a userspace sniffer: an AF_PACKET socket on vh1
                    re-sends every frame to mon0 (the way a sniffer-based tap works)
    pcap            a vtap flow without filter, to pcap:FILE with snaplen 128 (the
                    capture process); completeness counts the frames in the file

Figures: median throughput, the median of the paired ratios to no-tap, and completeness: the
fraction of vh1's packets (rx + tx, kernel counters) that arrived at mon1.
Targets: match-nothing >= 0.98, mirror-all >= 0.90 with >= 99.9 % complete.

    python3 bench/datapath.py [--rounds 8] [--seconds 2.5]      (root)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

SCENARIOS = ("no-tap", "match-nothing", "mirror-all", "relay", "pcap")
PCAP_SNAPLEN = 128
MATCH_NOTHING = "udp port 7"
COMPLETE_KINDS = ("mirror-all", "relay", "pcap")  # scenarios that should deliver every packet
TARGETS = {"match-nothing": 0.98, "mirror-all": 0.90}
COMPLETENESS_TARGET = 0.999
# The machine is shared: a higher priority for iperf3 (and the relay and capture processes, which
# are part of the data path measured) keeps other people's work from dominating the noise.
NICE = ("nice", "-n", "-10")


class Topology:
    def __init__(self):
        tag = f"vtapbdp{os.getpid()}"
        self.host, self.c1, self.c2, self.mon = (f"{tag}-{part}" for part in ("h", "c1", "c2", "m"))

    def build(self):
        for name in (self.host, self.c1, self.c2, self.mon):
            benchlib.new_netns(name)
        h = ["ip", "-n", self.host]
        benchlib.run(*h, "link", "add", "br0", "type", "bridge")
        for index, ns in ((1, self.c1), (2, self.c2)):
            benchlib.run(*h, "link", "add", f"vh{index}", "type", "veth", "peer", "name", f"e{index}", "netns", ns)
            benchlib.run(*h, "link", "set", f"vh{index}", "master", "br0", "up")
            benchlib.run("ip", "-n", ns, "addr", "add", f"10.99.0.{index}/24", "dev", f"e{index}")
            benchlib.run("ip", "-n", ns, "link", "set", f"e{index}", "up")
        benchlib.run(*h, "link", "add", "mon0", "type", "veth", "peer", "name", "mon1", "netns", self.mon)
        benchlib.run(*h, "link", "set", "mon0", "up")
        benchlib.run("ip", "-n", self.mon, "link", "set", "mon1", "up")
        benchlib.run(*h, "link", "set", "br0", "up")

    def destroy(self):
        benchlib.delete_netns(self.host, self.c1, self.c2, self.mon)


# ---------------------------------------------------------------- the userspace relay

PACKET_VNET_HDR = 15
PACKET_STATISTICS = 6
SOL_PACKET = 263
ETH_P_ALL = 0x0003


def relay(source: str, target: str) -> None:
    """Re-send every frame seen on `source` out of `target`, until SIGTERM.

    With PACKET_VNET_HDR the GSO super-frames that veth carries can be sent
    on as they are (without it, anything over the MTU is refused).
    """
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    rx.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    rx.bind((source, ETH_P_ALL))
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    tx.bind((target, 0))
    counts = {"relayed": 0, "failed": 0}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    buffer = bytearray(300 * 1024)
    view = memoryview(buffer)
    rx.settimeout(0.2)
    while not stopping:
        try:
            n = rx.recv_into(buffer)
        except (socket.timeout, InterruptedError):
            continue
        try:
            tx.send(view[:n])
            counts["relayed"] += 1
        except OSError:
            counts["failed"] += 1
    received, dropped = struct.unpack("II", rx.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    counts.update(socket_received=received, socket_dropped=dropped)
    print(json.dumps(counts), flush=True)


# ---------------------------------------------------------------- scenarios


class Scenario:
    """Puts one scenario in place in namespace H and takes it away again."""

    def __init__(self, name: str, client, workdir: str):
        self.name, self.client, self.relay = name, client, None
        self.pcap = os.path.join(workdir, "bench.pcapng")
        self.file_frames = None

    def __enter__(self):
        if self.name in ("match-nothing", "mirror-all"):
            self.client.create_session("bench", to="port:mon0")
            self.client.add_flow("bench", interface="vh1", direction="both", filter=MATCH_NOTHING if self.name == "match-nothing" else None)
        elif self.name == "pcap":
            self.client.create_session("bench", to=f"pcap:{self.pcap}", snaplen=PCAP_SNAPLEN)
            self.client.add_flow("bench", interface="vh1", direction="both")
            from vtap_drivers.linux.capture import running_captures

            for capture in running_captures(self.client.store.state_dir).values():
                benchlib.run("renice", "-n", NICE[-1], "-p", str(capture["pid"]))
        elif self.name == "relay":
            self.relay = subprocess.Popen([*NICE, sys.executable, os.path.abspath(__file__), "--relay", "vh1", "mon0"], stdout=subprocess.PIPE, text=True)
            time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        if self.relay is not None:
            self.relay.terminate()
            self.relay_counts = json.loads(self.relay.communicate(timeout=10)[0] or "{}")
        if self.name in ("match-nothing", "mirror-all", "pcap"):
            self.client.delete_session("bench")
        if self.name == "pcap":  # deleting the session stopped the capture and closed the file
            info = benchlib.run("capinfos", "-c", "-M", self.pcap).stdout
            self.file_frames = int(info.split("Number of packets:")[1].split()[0])
            os.unlink(self.pcap)


def iperf3(topology: Topology, seconds: float) -> float:
    """Gbit/s received by the server (the first half second, TCP's ramp-up, left out)."""
    for _ in range(50):
        result = benchlib.run(*NICE, "ip", "netns", "exec", topology.c1, "iperf3", "-c", "10.99.0.2", "-t", str(seconds), "-O", "0.5", "-J", check=False)
        if result.returncode == 0:
            return json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        time.sleep(0.1)  # the server may not be listening yet
    raise RuntimeError(f"iperf3 failed: {result.stdout[-500:]} {result.stderr[-500:]}")


def measure(topology: Topology, client, name: str, seconds: float, workdir: str) -> dict:
    with Scenario(name, client, workdir) as scenario:
        time.sleep(0.2)
        before_src, before_mon = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon)
        gbps = iperf3(topology, seconds)
        time.sleep(0.3)  # copies still in flight
        after_src, after_mon = benchlib.link_counters("vh1"), benchlib.link_counters("mon1", topology.mon)
    source = (after_src["rx"] - before_src["rx"]) + (after_src["tx"] - before_src["tx"])
    mirrored = after_mon["rx"] - before_mon["rx"] if scenario.file_frames is None else scenario.file_frames
    row = {"gbps": gbps, "source_packets": source, "mirrored_packets": mirrored, "completeness": mirrored / source if source else None}
    if scenario.relay is not None:
        row["relay"] = scenario.relay_counts
    return row


def _quartiles(values):
    """(25th, 75th percentile): how far apart the paired runs were."""
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4)
    return (q[0], q[2])


def summarize(rows: dict) -> dict:
    summary = {}
    for name in rows:
        gbps = benchlib.median(r["gbps"] for r in rows[name])
        ratios = [r["gbps"] / r["paired_no_tap_gbps"] for r in rows[name] if r.get("paired_no_tap_gbps")]
        summary[name] = {
            "median_gbps": gbps,
            "ratio_to_no_tap": benchlib.median(ratios) if name != "no-tap" else 1.0,
            "paired_ratios": ratios,
            "ratio_quartiles": _quartiles(ratios),
            "median_completeness": benchlib.median(r["completeness"] for r in rows[name]) if name in COMPLETE_KINDS else None,
            "min_completeness": min((r["completeness"] for r in rows[name] if r["completeness"] is not None), default=None) if name in COMPLETE_KINDS else None,
            "mirrored_packets_total": sum(r["mirrored_packets"] for r in rows[name]),
        }
    return summary


def report(summary: dict, env: dict, rounds: int, seconds: float) -> str:
    lines = [
        f"vtap data path benchmark: iperf3 TCP c1 -> c2 over veth + bridge, tap on vh1 (both directions)",
        f"{rounds} rounds x {seconds:g} s per run; each tap run paired with a no-tap run; ratio = median of the paired ratios. {env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        f"{'scenario':<15}{'Gbit/s':>9}{'ratio':>8}{'quartiles':>15}{'complete':>11}   target",
    ]
    for name in summary:
        s = summary[name]
        complete = f"{100 * s['median_completeness']:.2f}%" if s["median_completeness"] is not None else "-"
        target = ""
        if name in TARGETS:
            ok = s["ratio_to_no_tap"] >= TARGETS[name] and (name != "mirror-all" or (s["median_completeness"] or 0) >= COMPLETENESS_TARGET)
            target = f">= {TARGETS[name]:.2f}" + (f", >= {100 * COMPLETENESS_TARGET:.1f}% complete" if name == "mirror-all" else "") + ("  met" if ok else "  NOT met")
        spread = f"{s['ratio_quartiles'][0]:.2f}..{s['ratio_quartiles'][1]:.2f}" if s["ratio_quartiles"] else "-"
        lines.append(f"{name:<15}{s['median_gbps']:>9.2f}{s['ratio_to_no_tap']:>8.3f}{spread:>15}{complete:>11}   {target}")
    if "match-nothing" in summary:
        lines.append(f"\nmatch-nothing mirrored {summary['match-nothing']['mirrored_packets_total']} packets in total (should be 0)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset (no-tap is always run)")
    parser.add_argument("--relay", nargs=2, metavar=("SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay(*args.relay)
        return 0
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    env = benchlib.environment()
    topology = Topology()
    workdir = tempfile.mkdtemp(prefix="vtapbdp-")
    server = None
    try:
        topology.build()
        benchlib.enter_netns(topology.host)
        from vtap_core.client import Client

        server = subprocess.Popen([*NICE, "ip", "netns", "exec", topology.c2, "iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        scenarios = tuple(n for n in SCENARIOS if n == "no-tap" or n in args.scenarios.split(","))
        rows = {name: [] for name in scenarios}
        with Client(driver="linux", state=os.path.join(workdir, "vtap.db"), command="bench") as client:
            iperf3(topology, 1)  # warm-up
            taps = scenarios[1:]
            for round_number in range(args.rounds):
                shift = round_number % len(taps)
                for name in taps[shift:] + taps[:shift]:
                    # Each tap run is paired with a no-tap run next to it (order alternating by round):
                    # the ratio within a pair is what the machine's changing load disturbs least.
                    pair = ("no-tap", name) if round_number % 2 == 0 else (name, "no-tap")
                    result = {n: measure(topology, client, n, args.seconds, workdir) for n in pair}
                    result[name]["paired_no_tap_gbps"] = result["no-tap"]["gbps"]
                    for n in pair:
                        rows[n].append(result[n])
                    row = result[name]
                    complete = f", {100 * row['completeness']:.2f}% complete" if name in COMPLETE_KINDS else ""
                    print(f"round {round_number + 1} {name:<14} {row['gbps']:6.2f} Gbit/s vs no-tap {result['no-tap']['gbps']:6.2f}: {row['gbps'] / result['no-tap']['gbps']:.3f}{complete}", flush=True)
        summary = summarize(rows)
        text = report(summary, env, args.rounds, args.seconds)
        print("\n" + text)
        benchlib.save("datapath", {"environment": env, "rounds": args.rounds, "seconds": args.seconds, "summary": summary, "runs": rows, "targets": {**TARGETS, "mirror-all completeness": COMPLETENESS_TARGET}}, text)
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        topology.destroy()
        subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    sys.exit(main())
