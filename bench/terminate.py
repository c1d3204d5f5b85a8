"""Tunnel termination: can `vtap capture --listen erspan://` keep up?

A sender process blasts ERSPAN type III packets (inner frames of --size bytes)
from one end of a veth pair at the address on the other end, where
drivers/linux/terminate.py writes the inner frames to pcapng (and, in the
`file+port` case, also re-emits them on a second veth for an IDS). Figures:
frames sent, frames kept, completeness (kept / sent), and the rate kept
while the sender was sending. Writes results/terminate.json and .txt.

    python3 bench/terminate.py [--frames 200000] [--size 64,1400]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

ADDR = "10.80.0.2"


def outer_frame(mac: bytes, size: int) -> bytes:
    inner = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(max(0, size - 14))
    gre = struct.pack("!HHI", 0x1000, 0x22EB, 1) + struct.pack("!HHIHH", 0x2000, 5, 0, 0, 0x8) + inner
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(gre), 0, 0, 64, 47, 0, socket.inet_aton("10.80.0.1"), socket.inet_aton(ADDR))
    checksum = sum(struct.unpack("!10H", ip))
    checksum = ~((checksum & 0xFFFF) + (checksum >> 16)) & 0xFFFF
    ip = ip[:10] + struct.pack("!H", checksum) + ip[12:]
    return mac + b"\x02\x00\x00\x00\x00\x09\x08\x00" + ip + gre


def sender(netns: str, frame: bytes, count: int, started) -> None:
    benchlib.enter_netns(netns)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind(("s0", 0))
    started.set()
    for _ in range(count):
        try:
            sock.send(frame)
        except OSError:
            pass


def one_run(netns: str, mac: bytes, size: int, frames: int, to_port: bool) -> dict:
    from vtap_drivers.linux.terminate import terminate

    stop = threading.Event()
    result = {}
    path = os.path.join(tempfile.mkdtemp(prefix="vtapb-term-"), "t.pcapng")

    def receive():
        result["kept"] = terminate(f"erspan://{ADDR}?id=5", path, to="port:x0" if to_port else None, stop=stop, netns=netns)

    receiver = threading.Thread(target=receive)
    receiver.start()
    time.sleep(1.0)  # the socket is open
    started = multiprocessing.Event()
    process = multiprocessing.Process(target=sender, args=(netns, outer_frame(mac, size), frames, started))
    begin = time.monotonic()
    process.start()
    process.join()
    sending = time.monotonic() - begin
    time.sleep(1.0)  # what is queued gets read
    stop.set()
    receiver.join()
    os.unlink(path)
    kept = result["kept"]
    return {"size": size, "to_port": to_port, "sent": frames, "kept": kept, "completeness": kept / frames, "send_seconds": round(sending, 3), "sent_per_second": round(frames / sending), "kept_per_second": round(kept / sending)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--size", default="64,1400")
    args = parser.parse_args()
    netns = benchlib.new_netns(f"vtapbt{os.getpid()}")
    try:
        benchlib.run("ip", "-n", netns, "link", "add", "s0", "type", "veth", "peer", "name", "r0")
        benchlib.run("ip", "-n", netns, "link", "add", "x0", "type", "veth", "peer", "name", "x1")
        benchlib.run("ip", "-n", netns, "addr", "add", f"{ADDR}/24", "dev", "r0")
        for dev in ("s0", "r0", "x0", "x1"):
            benchlib.run("ip", "-n", netns, "link", "set", dev, "up")
        mac = bytes.fromhex(benchlib.run("ip", "-n", netns, "-br", "link", "show", "r0").stdout.split()[2].replace(":", ""))
        runs = [one_run(netns, mac, int(size), args.frames, to_port) for size in args.size.split(",") for to_port in (False, True)]
    finally:
        benchlib.delete_netns(netns)
    lines = [f"{'inner bytes':>11} {'output':>10} {'sent':>8} {'sent/s':>9} {'kept':>8} {'complete':>9} {'kept/s':>9}"]
    for r in runs:
        lines.append(f"{r['size']:>11} {'file+port' if r['to_port'] else 'file':>10} {r['sent']:>8} {r['sent_per_second']:>9} {r['kept']:>8} {r['completeness']:>9.4f} {r['kept_per_second']:>9}")
    lines.append(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (sender and receiver share them)")
    text = "\n".join(lines)
    print(text)
    benchlib.save("terminate", {"environment": benchlib.environment(), "runs": runs}, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
