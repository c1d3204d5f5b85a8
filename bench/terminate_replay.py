"""Tunnel termination's own CPU per frame: ring blocks replayed through terminate.py's reading loop.

No kernel and no sender: blocks laid out as the kernel fills a TPACKET_V3
ring (block header, tpacket3_hdr per packet, IP packet at tp_mac) hold the
same tunnel packet (with a rising GRE sequence number and ERSPAN timestamp),
and the loop of `vtap capture --listen` reads them and writes pcapng to a
file in a temporary folder. The figure is the process's CPU time (user +
system) per frame: what vtap spends, without the kernel's share and
less sensitive to the machine's load than bench/terminate.py.

    python3 bench/terminate_replay.py [--frames 300000] [--size 64] [--tunnels erspan,gre,vxlan,erspan+ah] [--profile TUNNEL] [--label NAME]

Writes results/terminate_replay.json and .txt (terminate_replay-NAME.* with
--label: e.g. the same script run on an older checkout's modules, for comparison).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import sys
import tempfile
import threading
import time

import benchlib
from replayring import ReplayRing

from vtap_drivers.linux import terminate
from vtap_drivers.linux.pcapng import PcapngWriter

BLOCK_SIZE = terminate.TUNNEL_BLOCK_SIZE
FIRST_PACKET = 48  # after the block descriptor
PACKET_HEADER = struct.Struct("IIIIIIHH")  # tpacket3_hdr up to tp_net
MAC_OFFSET = 80  # tpacket3_hdr + sockaddr_ll, aligned: where the kernel puts a SOCK_DGRAM packet


def tunnel_packet(tunnel: str, size: int, number: int) -> bytes:
    """The IP packet of one tunnel packet (the ring holds packets from their IP header); TUNNEL+ah: under an
    IPsec Authentication Header (24 bytes, its sequence number rising)."""
    tunnel, _, under = tunnel.partition("+")
    inner = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(max(0, size - 14))
    if tunnel == "erspan":  # ERSPAN type III, session 5, egress, GRE sequence
        payload, proto = struct.pack("!HHI", 0x1000, 0x22EB, number) + struct.pack("!HHIHH", 0x2000, 5, number * 7, 0, 0x8) + inner, 47
    elif tunnel == "gre":  # gretap, key 7
        payload, proto = struct.pack("!HHI", 0x2000, 0x6558, 7) + inner, 47
    else:  # VXLAN, VNI 42
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8) + inner
        payload, proto = struct.pack("!HHHH", 40000, 4789, 8 + len(vxlan), 0) + vxlan, 17
    if under == "ah":
        payload, proto = struct.pack("!BBHII", proto, 4, 0, 0x1234, number) + bytes(12) + payload, 51
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), number & 0xFFFF, 0x4000, 64, proto, 0, bytes([10, 80, 0, 1]), bytes([10, 80, 0, 2])) + payload


def ring_blocks(packets, block_size: int = BLOCK_SIZE) -> bytearray:
    """Blocks as the kernel hands them over (status TP_STATUS_USER), as many as the packets need."""
    blocks, block, position, count = [], None, 0, 0
    for number, packet in enumerate(packets):
        step = (MAC_OFFSET + len(packet) + 15) & ~15
        if block is None or position + step > block_size:
            if block is not None:
                struct.pack_into("III", block, 8, 1, count, FIRST_PACKET)
                blocks.append(block)
            block, position, count = bytearray(block_size), FIRST_PACKET, 0
        seconds, nanoseconds = divmod(1_700_000_000_000_000_000 + number * 1000, 1_000_000_000)
        PACKET_HEADER.pack_into(block, position, step, seconds, nanoseconds, len(packet), len(packet), 1, MAC_OFFSET, MAC_OFFSET)
        block[position + MAC_OFFSET : position + MAC_OFFSET + len(packet)] = packet
        position += step
        count += 1
    struct.pack_into("III", block, 8, 1, count, FIRST_PACKET)
    blocks.append(block)
    return bytearray().join(blocks)


def replay(tunnel: str, blocks: bytearray, path: str) -> terminate.Termination:
    listen = terminate.parse_listen(f"{tunnel.partition('+')[0]}://10.80.0.2")
    counts = terminate.Termination()
    with PcapngWriter.create(path, interface=False) as writer:
        terminate._read_ring(listen, ReplayRing(blocks, BLOCK_SIZE), writer, None, None, counts, threading.Event(), None, None)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tunnels", default="erspan,gre,vxlan")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", help="a tunnel: print cProfile's top functions for it instead")
    parser.add_argument("--label", help="results/terminate_replay-LABEL.*, and LABEL in the summary's first line")
    args = parser.parse_args()
    env = benchlib.environment()
    label = f" [{args.label}: {os.path.dirname(terminate.__file__)}]" if args.label else ""
    runs, lines = [], [f"vtap capture --listen's reading loop on replayed ring blocks ({args.size}-byte inner frames, {args.frames:,} frames, best of {args.repeats}){label}",
                       f"{env['date']} commit {env['commit']}, Python {env['python']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}", "",
                       f"{'tunnel':>9} {'us/frame':>9} {'frames kept':>12} {'file bytes':>11} {'load':>5}"]
    with tempfile.TemporaryDirectory(prefix="vtapb-replay-") as workdir:
        path = os.path.join(workdir, "replay.pcapng")
        for tunnel in (args.profile,) if args.profile else args.tunnels.split(","):
            blocks = ring_blocks(tunnel_packet(tunnel, args.size, number) for number in range(args.frames))
            if args.profile:
                profiler = cProfile.Profile()
                profiler.runcall(replay, tunnel, blocks, path)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
                return 0
            best = None
            for _ in range(args.repeats):
                started = time.process_time()
                counts = replay(tunnel, blocks, path)
                spent = time.process_time() - started
                best = spent if best is None else min(best, spent)
            assert counts.kept == args.frames, counts
            run = {"tunnel": tunnel, "frames": args.frames, "cpu_seconds": round(best, 3), "cpu_us_per_frame": round(1e6 * best / args.frames, 3), "file_bytes": os.path.getsize(path), "loadavg": round(os.getloadavg()[0], 2)}
            runs.append(run)
            lines.append(f"{tunnel:>9} {run['cpu_us_per_frame']:>9.3f} {counts.kept:>12,} {run['file_bytes']:>11,} {run['loadavg']:>5.2f}")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    benchlib.save("terminate_replay" + (f"-{args.label}" if args.label else ""), {"environment": env, "label": args.label, "size": args.size, "runs": runs}, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
