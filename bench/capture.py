"""vtap's pcap: capture side by side with tcpdump -w and dumpcap -w, on the same mirrored stream.

Topology (two fresh namespaces): a sender in C transmits 64-byte (or --size)
frames on peer0; they arrive at src0 in B, whose ingress a vtap flow mirrors.
  vtap      the session's target is pcap:FILE (vtap's ifb sink + capture process)
  tcpdump   the target is port:mon0, an ifb with no queue like vtap's sink; tcpdump -i mon0 -w FILE
  dumpcap   same sink; dumpcap -i mon0 -w FILE
  no-tap    no session: how fast the traffic goes alone
  mirror    the target is port:mon0 and nothing reads it: what the mirror itself costs the traffic
Rates rise from 50k frames/s to as fast as the sender goes (rate 0). Then a TCP
bulk stream (iperf3 peer0 -> src0) with each capture.

Per run: completeness = frames in the file / frames through src0 (its rx
counter), CPU per frame = the capture process's user+system time / frames in
the file, and the traffic's own packets/s (Gbit/s for TCP) with the capture
running, next to no-tap's. The sender (and the kernel's forwarding and
mirroring, in its context) runs on the last CPU, every capture on CPU 0, both
at nice -10: the machine is shared, and this keeps others' load from deciding
which tool wins.

With --datapath tcx every mirror is one eBPF program on the tcx hook: vtap's
pcap: mirror writes each frame into the sink's BPF ring buffer (no clone),
the others (mirror, tcpdump, dumpcap: port:mon0) clone with
bpf_clone_redirect. Per vtap run the IRQ work interrupts of every CPU
(/proc/interrupts IWI) are counted too: the ring's wakeups of its reader.

Needs root, cc (the sender is built on the fly), tcpdump, dumpcap, capinfos, iperf3.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import benchlib

TOOLS = ("no-tap", "mirror", "vtap", "tcpdump", "dumpcap")
READERS = ("vtap", "tcpdump", "dumpcap")
RATES = (50_000, 100_000, 200_000, 400_000, 1_000_000, 0)  # 0: as fast as the sender goes
SENDER_CPU = str(os.cpu_count() - 1)
CAPTURE_CPU = "0"
SETTLE = 1.5  # seconds after the traffic stops: every tool hands over what it buffered (tcpdump: 1 s timeout)
TARGETS = {"completeness": ">= dumpcap's at every rate", "cpu_per_frame": "<= 1.5 x dumpcap's", "traffic_with_vtap": ">= 0.75 of no-tap"}
HERE = os.path.dirname(os.path.abspath(__file__))


class Lab:
    def __init__(self, workdir: str):
        tag = f"vtapbcap{os.getpid()}"
        self.b, self.c = f"{tag}-b", f"{tag}-c"
        self.workdir = workdir
        self.sender = os.path.join(workdir, "capture_sender")

    def build(self):
        benchlib.run("cc", "-O2", "-o", self.sender, os.path.join(HERE, "capture_sender.c"))
        for name in (self.b, self.c):
            benchlib.new_netns(name)
        benchlib.run("ip", "-n", self.b, "link", "add", "src0", "type", "veth", "peer", "name", "peer0", "netns", self.c)
        benchlib.run("ip", "-n", self.b, "addr", "add", "10.98.0.2/24", "dev", "src0")
        benchlib.run("ip", "-n", self.c, "addr", "add", "10.98.0.1/24", "dev", "peer0")
        benchlib.run("ip", "-n", self.b, "link", "set", "src0", "up")
        benchlib.run("ip", "-n", self.c, "link", "set", "peer0", "up")
        benchlib.run("ip", "-n", self.b, "link", "add", "mon0", "type", "ifb")
        benchlib.run("ip", "-n", self.b, "link", "set", "mon0", "up")
        benchlib.run("tc", "-n", self.b, "qdisc", "replace", "dev", "mon0", "root", "noqueue")

    def destroy(self):
        from vtap_drivers.linux import tcxmirror

        benchlib.delete_netns(self.b, self.c)
        try:
            os.rmdir(tcxmirror.pin_dir(self.b))  # bpffs outlives the namespace: --datapath tcx left its (empty) pin folder
        except OSError:
            pass

    def rx(self) -> int:
        return benchlib.link_counters("src0", self.b)["rx"]

    def send(self, rate: int, seconds: float, size: int) -> tuple[int, float]:
        out = benchlib.run(*benchlib.pinned(SENDER_CPU, "ip", "netns", "exec", self.c, self.sender, "peer0", str(rate), str(seconds), str(size))).stdout
        sent, elapsed = out.split()
        return int(sent), float(elapsed)

    def iperf3(self, seconds: float, bitrate: str | None = None) -> float:
        import json

        limit = ["-b", bitrate] if bitrate else []
        out = benchlib.run(*benchlib.pinned(SENDER_CPU, "ip", "netns", "exec", self.c, "iperf3", "-c", "10.98.0.2", "-t", str(seconds), "-J", *limit), check=False).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def irq_work_interrupts() -> int:
    """IRQ work interrupts so far, all CPUs (/proc/interrupts IWI): a BPF ring wakes its reader through irq_work."""
    with open("/proc/interrupts") as f:
        for line in f:
            if line.strip().startswith("IWI:"):
                return sum(int(part) for part in line.split()[1:] if part.isdigit())
    return 0


class Capture:
    """One tool capturing the mirrored stream for the length of a `with`."""

    def __init__(self, tool: str, lab: Lab, client, state_dir: str):
        self.tool, self.lab, self.client, self.state_dir = tool, lab, client, state_dir
        self.path = os.path.join(lab.workdir, f"{tool}.pcapng")
        self.pid = self.process = None
        self.dropped_in_status = None

    def __enter__(self):
        from vtap_drivers.linux.capture import running_captures

        if self.tool == "no-tap":
            return self
        target = f"pcap:{self.path}" if self.tool == "vtap" else "port:mon0"
        self.client.create_session("bench", to=target)
        self.client.add_flow("bench", interface="src0", direction="in")
        if self.tool == "mirror":
            return self
        if self.tool == "vtap":
            (process,) = running_captures(self.state_dir).values()
            self.pid = process["pid"]
            benchlib.run("taskset", "-pc", CAPTURE_CPU, str(self.pid))
            benchlib.run("renice", "-n", "-10", "-p", str(self.pid))
        else:
            command = ["tcpdump", "-i", "mon0", "-n", "-w", self.path] if self.tool == "tcpdump" else ["dumpcap", "-i", "mon0", "-q", "-w", self.path]
            self.process = subprocess.Popen(benchlib.pinned(CAPTURE_CPU, "ip", "netns", "exec", self.lab.b, *command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            line = self.process.stderr.readline()  # "listening on mon0 ..." / "Capturing on 'mon0'"
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.tool} did not start: {line}")
            self.pid = self._tool_pid()
            time.sleep(0.5)
        self.cpu_at_start = benchlib.cpu_seconds(self.pid)
        return self

    def _tool_pid(self) -> int:
        """The tool's own pid (ip netns exec execs it, taskset and nice exec too: the same process)."""
        return self.process.pid

    def cpu_used(self) -> float | None:
        return None if self.pid is None else benchlib.cpu_seconds(self.pid) - self.cpu_at_start

    def __exit__(self, *exc):
        if self.tool == "no-tap":
            return
        if self.tool == "vtap":
            (row,) = self.client.status()
            self.dropped_in_status = row.capture_dropped
        elif self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=20)
        self.client.delete_session("bench")  # vtap's capture drains its ring and closes the file


def run_one(lab: Lab, client, state_dir: str, tool: str, rate: int | None, seconds: float, size: int, tcp_bitrate: str | None = None) -> dict:
    with Capture(tool, lab, client, state_dir) as capture:
        before, irq_work = lab.rx(), irq_work_interrupts()
        if rate is None:
            gbps, elapsed, sent = lab.iperf3(seconds, tcp_bitrate), seconds, None
        else:
            sent, elapsed = lab.send(rate, seconds, size)
            gbps = None
        time.sleep(SETTLE)
        through = lab.rx() - before
        cpu = capture.cpu_used()
        irq_work = irq_work_interrupts() - irq_work
    row = {"tool": tool, "rate": rate, "sent": sent, "through_source": through, "pps": through / elapsed, "gbps": gbps, "irq_work": irq_work, "load": os.getloadavg()[0]}
    if tool in READERS:
        frames = benchlib.frames_in(capture.path)
        os.unlink(capture.path)
        row.update(frames=frames, completeness=frames / through if through else None, cpu_seconds=cpu, cpu_us_per_frame=1e6 * cpu / frames if frames else None, dropped_in_status=capture.dropped_in_status)
    return row


def summarize(runs: list[dict]) -> dict:
    """Medians per (rate, tool); ratio = the traffic's pps (or Gbit/s) over no-tap's at that rate."""
    out = {}
    for key in sorted({("tcp" if r["rate"] is None else str(r["rate"])) for r in runs}, key=lambda k: (k == "tcp", k == "0", int(k) if k != "tcp" else 0)):
        rows = [r for r in runs if ("tcp" if r["rate"] is None else str(r["rate"])) == key]
        figures = {}
        for tool in TOOLS:
            mine = [r for r in rows if r["tool"] == tool]
            if not mine:
                continue
            speed = "gbps" if key == "tcp" else "pps"
            figures[tool] = {
                speed: benchlib.median([r[speed] for r in mine]),
                "completeness": benchlib.median([r.get("completeness") for r in mine]),
                "cpu_us_per_frame": benchlib.median([r.get("cpu_us_per_frame") for r in mine]),
                "dropped_in_status": benchlib.median([r.get("dropped_in_status") for r in mine]),
                "irq_work_per_frame": benchlib.median([r["irq_work"] / r["through_source"] if r.get("through_source") else None for r in mine]),
            }
        base = figures.get("no-tap", {}).get("gbps" if key == "tcp" else "pps")
        for tool, f in figures.items():
            speed = f.get("gbps" if key == "tcp" else "pps")
            f["traffic_vs_no_tap"] = speed / base if base and speed is not None else None
        out[key] = figures
    return out


def report(summary: dict, env: dict, rounds: int, seconds: float, size: int, tcp_bitrate: str | None = None, datapath: str = "tc", loads: tuple = ()) -> str:
    tcp = f"TCP: iperf3 at {tcp_bitrate}bit/s" if tcp_bitrate else "TCP: iperf3, as fast as it goes"
    lines = [
        f"vtap pcap: capture vs tcpdump -w and dumpcap -w on the same mirrored stream ({size}-byte frames; {tcp}; datapath={datapath})",
        f"{rounds} round(s) x {seconds} s per run; medians. {env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "rate: frames/s asked of the sender (0 = as fast as it goes); speed: frames/s through the source (Gbit/s for tcp)",
        "",
        *([f"load average (1 min) during the runs: {min(loads):.2f} .. {max(loads):.2f}"] if loads else []),
        "irq_work/frame: IRQ work interrupts (all CPUs) per frame through the source during the run",
        "",
        f"{'rate':>8} {'tool':<8} {'speed':>10} {'vs no-tap':>9} {'complete':>9} {'us/frame':>9} {'dropped':>8} {'irq_work/frame':>14}",
    ]
    for key, figures in summary.items():
        for tool, f in figures.items():
            speed = f.get("gbps") if key == "tcp" else f.get("pps")
            speed_text = "-" if speed is None else (f"{speed:.2f}G" if key == "tcp" else f"{speed:,.0f}")
            complete = "-" if f["completeness"] is None else f"{100 * f['completeness']:.2f}%"
            cpu = "-" if f["cpu_us_per_frame"] is None else f"{f['cpu_us_per_frame']:.2f}"
            dropped = "-" if f["dropped_in_status"] is None else f"{f['dropped_in_status']:.0f}"
            ratio = "-" if f["traffic_vs_no_tap"] is None else f"{f['traffic_vs_no_tap']:.2f}"
            iwi = "-" if f.get("irq_work_per_frame") is None else f"{f['irq_work_per_frame']:.5f}"
            lines.append(f"{key:>8} {tool:<8} {speed_text:>10} {ratio:>9} {complete:>9} {cpu:>9} {dropped:>8} {iwi:>14}")
    lines += ["", "targets: " + "; ".join(f"{k} {v}" for k, v in TARGETS.items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64, help="frame size in bytes (64..128 in the issue)")
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES))
    parser.add_argument("--no-tcp", action="store_true")
    parser.add_argument("--tcp-bitrate", help="iperf3 -b (e.g. 4G): the TCP stream at one rate for every tool, so completeness compares on a shared machine")
    parser.add_argument("--name", help="results/NAME.json and .txt (default capture, or capture_tcx with --datapath tcx)")
    parser.add_argument("--datapath", choices=("tc", "tcx"), default="tc", help="vtap's data path (tcx: pcap: through a BPF ring buffer, no clone)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="which of " + ", ".join(TOOLS))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/capture.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    env = benchlib.environment()
    workdir = tempfile.mkdtemp(prefix="vtapbcap-")
    lab = Lab(workdir)
    server = None
    runs = []
    try:
        lab.build()
        from vtap_core.client import Client

        state_dir = os.path.join(workdir, "state")
        os.makedirs(state_dir)
        server = subprocess.Popen(["ip", "netns", "exec", lab.b, "iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rates = [int(r) for r in args.rates.split(",") if r] + ([] if args.no_tcp else [None])
        with Client(driver="linux", state=os.path.join(state_dir, "vtap.db"), netns=lab.b, command="bench", datapath=args.datapath) as client:
            for round_number in range(args.rounds):
                for rate in rates:
                    chosen = tuple(args.tools.split(","))
                    tools = chosen if round_number % 2 == 0 else chosen[::-1]
                    for tool in tools:
                        row = run_one(lab, client, state_dir, tool, rate, args.seconds, args.size, args.tcp_bitrate)
                        runs.append(row)
                        speed = f"{row['gbps']:.2f} Gbit/s" if rate is None else f"{row['pps']:,.0f} frames/s"
                        extra = "" if tool not in READERS else f", {100 * (row['completeness'] or 0):.2f}% complete, {row['cpu_us_per_frame'] or 0:.2f} us/frame"
                        print(f"round {round_number + 1} rate {'tcp' if rate is None else rate:>8} {tool:<8} {speed}{extra}", flush=True)
        summary = summarize(runs)
        loads = tuple(r["load"] for r in runs)
        text = report(summary, env, args.rounds, args.seconds, args.size, args.tcp_bitrate, args.datapath, loads)
        print("\n" + text)
        name = args.name or ("capture_tcx" if args.datapath == "tcx" else "capture")
        benchlib.save(name, {"environment": env, "datapath": args.datapath, "rounds": args.rounds, "seconds": args.seconds, "size": args.size, "tcp_bitrate": args.tcp_bitrate, "summary": summary, "runs": runs, "targets": TARGETS}, text)
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        lab.destroy()
        subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    sys.exit(main())
