"""Tunnel termination: `vtap capture --listen` side by side with dumpcap on the same tunnel stream.

A sender in C (capture_sender.c, batched sendmmsg) transmits one tunnel
packet over and over from s0, at rising rates (50k frames/s to as fast as
it goes), to ADDR on the other end of a veth pair, r0. Tunnels: ERSPAN
type III (session 5), GRE with a key (gretap), VXLAN (VNI 42); inner frames
of --size bytes. Each rate is measured back to back:
  none      nothing reads the stream (a socket holds ADDR / the UDP port, as vtap's does)
  vtap      vtap capture --listen erspan|gre|vxlan://ADDR -w FILE
  dumpcap   dumpcap -i r0 -f 'ip proto 47' | 'udp dst port 4789' -w FILE (the same holder socket)
Per run: completeness = frames in the file / packets r0 received, CPU per
frame = the tool's user+system time / frames in the file, the stream's own
rate (frames/s through r0) with each tool running, and the drops vtap's
summary reports (and what it left unread in the ring, if any). The sender (and the kernel's receive path, in its context)
runs on the last CPU, each tool on CPU 0, both at nice -10; the load
average is recorded beside every row (the machine is shared).

    python3 bench/terminate.py [--seconds 3] [--size 64] [--tunnels erspan,gre,vxlan] [--rates 50000,...,0]

Needs root, cc, dumpcap, capinfos. Writes results/terminate.json and .txt.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import benchlib

ADDR = "10.80.0.2"
PEER = "10.80.0.1"
VXLAN_PORT = 4789
RATES = (50_000, 100_000, 200_000, 400_000, 1_000_000, 0)  # 0: as fast as the sender goes
TOOLS = ("none", "vtap", "dumpcap")
SENDER_CPU = str(os.cpu_count() - 1)
TOOL_CPU = "0"
SETTLE = 1.5  # seconds after the stream stops: each tool writes what it holds
HERE = os.path.dirname(os.path.abspath(__file__))
VTAP = os.path.join(os.path.dirname(sys.executable), "vtap")
DUMPCAP_FILTER = {"erspan": "ip proto 47", "gre": "ip proto 47", "vxlan": f"udp dst port {VXLAN_PORT}"}


def checksummed(ip: bytes) -> bytes:
    total = sum(struct.unpack("!10H", ip))
    total = (total & 0xFFFF) + (total >> 16)
    return ip[:10] + struct.pack("!H", ~(total + (total >> 16)) & 0xFFFF) + ip[12:]


def outer_frame(tunnel: str, mac: bytes, size: int) -> bytes:
    inner = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(max(0, size - 14))
    if tunnel == "erspan":  # GRE with sequence, ERSPAN type III, session 5, egress
        payload, proto = struct.pack("!HHI", 0x1000, 0x22EB, 1) + struct.pack("!HHIHH", 0x2000, 5, 0, 0, 0x8) + inner, 47
    elif tunnel == "gre":  # gretap, key 7
        payload, proto = struct.pack("!HHI", 0x2000, 0x6558, 7) + inner, 47
    else:  # VXLAN, VNI 42; UDP checksum 0 (none)
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8) + inner
        payload, proto = struct.pack("!HHHH", 40000, VXLAN_PORT, 8 + len(vxlan), 0) + vxlan, 17
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, socket.inet_aton(PEER), socket.inet_aton(ADDR))
    return mac + b"\x02\x00\x00\x00\x00\x09\x08\x00" + checksummed(ip) + payload


class Lab:
    def __init__(self, workdir: str):
        self.netns = f"vtapbt{os.getpid()}"
        self.workdir = workdir
        self.sender = os.path.join(workdir, "capture_sender")

    def build(self):
        benchlib.run("cc", "-O2", "-o", self.sender, os.path.join(HERE, "capture_sender.c"))
        benchlib.new_netns(self.netns)
        benchlib.run("ip", "-n", self.netns, "link", "add", "s0", "type", "veth", "peer", "name", "r0")
        benchlib.run("ip", "-n", self.netns, "addr", "add", f"{ADDR}/24", "dev", "r0")
        for dev in ("s0", "r0"):
            benchlib.run("ip", "-n", self.netns, "link", "set", dev, "up")
        self.mac = bytes.fromhex(benchlib.run("ip", "-n", self.netns, "-br", "link", "show", "r0").stdout.split()[2].replace(":", ""))

    def destroy(self):
        benchlib.delete_netns(self.netns)

    def rx(self) -> int:
        return benchlib.link_counters("r0", self.netns)["rx"]

    def send(self, frame_file: str, rate: int, seconds: float) -> tuple[int, float]:
        out = benchlib.run(*benchlib.pinned(SENDER_CPU, "ip", "netns", "exec", self.netns, self.sender, "s0", str(rate), str(seconds), "@" + frame_file)).stdout
        sent, elapsed = out.split()
        return int(sent), float(elapsed)

    def holder(self, tunnel: str) -> socket.socket:
        """What vtap's own socket does for the other runs: ADDR (and the port) held, so the kernel sends no ICMP unreachable."""
        from pyroute2 import netns as pr_netns

        from vtap_drivers.linux.ring import attach_filter

        if tunnel == "vxlan":
            sock = pr_netns.create_socket(self.netns, socket.AF_INET, socket.SOCK_DGRAM, 0, flags=0)
            sock.bind((ADDR, VXLAN_PORT))
        else:
            sock = pr_netns.create_socket(self.netns, socket.AF_INET, socket.SOCK_RAW, 47, flags=0)
            sock.bind((ADDR, 0))
        attach_filter(sock, [(0x06, 0, 0, 0)])  # ret 0: queue nothing
        return sock


def start_tool(lab: Lab, tool: str, tunnel: str, path: str):
    if tool == "vtap":
        command = [VTAP, "capture", "--listen", f"{tunnel}://{ADDR}" + (f":{VXLAN_PORT}" if tunnel == "vxlan" else ""), "-w", path]
    else:
        command = ["dumpcap", "-i", "r0", "-f", DUMPCAP_FILTER[tunnel], "-q", "-w", path]
    process = subprocess.Popen(benchlib.pinned(TOOL_CPU, "ip", "netns", "exec", lab.netns, *command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not os.path.exists(path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # both create the file once they read
    time.sleep(0.5)
    if process.poll() is not None:
        raise RuntimeError(f"{tool} did not start: {process.stderr.read()}")
    return process  # ip netns exec, taskset and nice exec: this pid is the tool's


def run_one(lab: Lab, tunnel: str, tool: str, rate: int, seconds: float, frame_file: str) -> dict:
    path = os.path.join(lab.workdir, f"{tool}.pcapng")
    holder = lab.holder(tunnel) if tool != "vtap" else None
    process = start_tool(lab, tool, tunnel, path) if tool != "none" else None
    try:
        cpu_at_start = benchlib.cpu_seconds(process.pid) if process else 0.0
        load = os.getloadavg()[0]
        before = lab.rx()
        sent, elapsed = lab.send(frame_file, rate, seconds)
        time.sleep(SETTLE)
        through = lab.rx() - before
        cpu = benchlib.cpu_seconds(process.pid) - cpu_at_start if process else None
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        if holder is not None:
            holder.close()
    row = {"tunnel": tunnel, "tool": tool, "rate": rate, "sent": sent, "through": through, "pps": round(through / elapsed), "loadavg": round(load, 2)}
    if process is not None:
        frames = benchlib.frames_in(path)
        os.unlink(path)
        row.update(frames=frames, completeness=frames / through if through else None, cpu_seconds=round(cpu, 3), cpu_us_per_frame=round(1e6 * cpu / frames, 2) if frames else None)
        if tool == "vtap":
            summary = err.strip().splitlines()[-1] if err.strip() else ""
            parts = summary.split("; ")
            row["dropped_in_summary"] = int(parts[1].split()[0]) if len(parts) > 1 else None
            row["unread_in_summary"] = int(parts[2].split()[0]) if len(parts) > 2 else 0
    return row


def report(runs: list[dict], env: dict, seconds: float, size: int) -> str:
    lines = [
        f"vtap capture --listen vs dumpcap on the same tunnel stream ({size}-byte inner frames, {seconds} s per run)",
        f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "rate: frames/s asked of the sender (0 = as fast as it goes); speed: frames/s through r0; load: 1-min load average at the run's start",
        "",
        f"{'tunnel':>7} {'rate':>8} {'tool':>8} {'speed':>9} {'vs none':>8} {'complete':>9} {'us/frame':>9} {'cpu s':>6} {'dropped':>8} {'load':>5}",
    ]
    base = {}
    for r in runs:
        if r["tool"] == "none":
            base[(r["tunnel"], r["rate"])] = r["pps"]
        ratio = r["pps"] / base[(r["tunnel"], r["rate"])] if base.get((r["tunnel"], r["rate"])) else None
        complete = f"{100 * r['completeness']:.2f}%" if r.get("completeness") is not None else "-"
        us = f"{r['cpu_us_per_frame']:.2f}" if r.get("cpu_us_per_frame") is not None else "-"
        cpu = f"{r['cpu_seconds']:.2f}" if r.get("cpu_seconds") is not None else "-"
        dropped = r.get("dropped_in_summary")
        lines.append(f"{r['tunnel']:>7} {r['rate']:>8} {r['tool']:>8} {r['pps']:>9,} {ratio:>8.2f} {complete:>9} {us:>9} {cpu:>6} {'-' if dropped is None else dropped:>8} {r['loadavg']:>5.2f}")
    lines.append("")
    lines.append("targets: completeness >= dumpcap's at every rate; CPU per frame within 1.5x of dumpcap's")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tunnels", default="erspan,gre,vxlan")
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES))
    args = parser.parse_args()
    env = benchlib.environment()
    runs = []
    with tempfile.TemporaryDirectory(prefix="vtapb-term-") as workdir:
        lab = Lab(workdir)
        try:
            lab.build()
            for tunnel in args.tunnels.split(","):
                frame_file = os.path.join(workdir, f"{tunnel}.frame")
                with open(frame_file, "wb") as f:
                    f.write(outer_frame(tunnel, lab.mac, args.size))
                for rate in (int(r) for r in args.rates.split(",")):
                    for tool in TOOLS:  # back to back: the same load for each
                        runs.append(run_one(lab, tunnel, tool, rate, args.seconds, frame_file))
                        print(runs[-1], flush=True)
        finally:
            lab.destroy()
    text = report(runs, env, args.seconds, args.size)
    print(text)
    benchlib.save("terminate", {"environment": env, "seconds": args.seconds, "size": args.size, "runs": runs}, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
