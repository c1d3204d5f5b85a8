"""A pcap target's capture loop on its own: CPU per frame, ring blocks replayed through capture.record_frames.

No kernel and no sender: blocks laid out as the kernel fills a pcap sink's
TPACKET_V3 ring (block header, tpacket3_hdr per frame, the frame at tp_mac)
hold frames of one size (64 bytes, 1514, a TSO stream's 65,226), and the loop
of the capture process writes them as pcapng to a file in a temporary folder
(the page cache: the copy into the file is in the figure). The figure is the
process's CPU time (user + system) per frame: what vtap spends, without the
kernel's share of the mirror and less sensitive to the machine's load than
bench/capture.py.

    python3 bench/capture_replay.py [--bytes 50000000] [--sizes 64,1514,65226] [--repeats 3] [--label NAME]

Writes results/capture_replay.json and .txt (capture_replay-NAME.* with --label: e.g.
the same script run on an older checkout's capture.py, for comparison).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import threading
import time

import benchlib
from replayring import ReplayRing

from vtap_drivers.linux import capture
from vtap_drivers.linux.pcapng import PcapngWriter
from vtap_drivers.linux.ring import BLOCK_SIZE

FIRST_FRAME = 48  # after the block descriptor
FRAME_HEADER = struct.Struct("IIIIIIHH")  # tpacket3_hdr up to tp_net
MAC_OFFSET = 82  # tpacket3_hdr + sockaddr_ll, the network header aligned to 16: where a SOCK_RAW frame starts


def ring_blocks(size: int, frames: int) -> bytearray:
    """Blocks as the kernel hands them over (status TP_STATUS_USER), holding `frames` frames of `size` bytes."""
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(size - 14)
    step = (MAC_OFFSET + size + 15) & ~15
    per_block = (BLOCK_SIZE - FIRST_FRAME) // step
    blocks = []
    for first in range(0, frames, per_block):
        block = bytearray(BLOCK_SIZE)
        count = min(per_block, frames - first)
        for index in range(count):
            position = FIRST_FRAME + index * step
            seconds, nanoseconds = divmod(1_700_000_000_000_000_000 + (first + index) * 1000, 1_000_000_000)
            FRAME_HEADER.pack_into(block, position, step, seconds, nanoseconds, size, size, 1, MAC_OFFSET, MAC_OFFSET + 14)
            block[position + MAC_OFFSET : position + MAC_OFFSET + size] = frame
        struct.pack_into("III", block, 8, 1, count, FIRST_FRAME)
        blocks.append(block)
    return bytearray().join(blocks)


def replay(blocks: bytearray, path: str) -> int:
    with PcapngWriter.create(path, if_name="vtapc0") as writer:
        return capture.record_frames(ReplayRing(blocks, BLOCK_SIZE), writer, threading.Event())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=50_000_000, help="frame bytes per size (so many frames of each)")
    parser.add_argument("--sizes", default="64,1514,65226")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", help="results/capture_replay-LABEL.*, and LABEL in the summary's first line")
    args = parser.parse_args()
    env = benchlib.environment()
    label = f" [{args.label}: {os.path.dirname(capture.__file__)}]" if args.label else ""
    runs = []
    lines = [f"a pcap target's capture loop on replayed ring blocks ({args.bytes:,} frame bytes per size, best of {args.repeats}){label}",
             f"{env['date']} commit {env['commit']}, Python {env['python']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}", "",
             f"{'size':>6} {'frames':>9} {'us/frame':>9} {'MB/s':>7} {'load':>5}"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="vtapb-capreplay-") as workdir:
        path = os.path.join(workdir, "replay.pcapng")
        for size in (int(s) for s in args.sizes.split(",")):
            frames = max(1, args.bytes // size)
            blocks = ring_blocks(size, frames)
            best = None
            for _ in range(args.repeats):
                started = time.process_time()
                written = replay(blocks, path)
                spent = time.process_time() - started
                best = spent if best is None else min(best, spent)
                os.unlink(path)
            assert written == frames, (written, frames)
            run = {"size": size, "frames": frames, "cpu_seconds": round(best, 3), "cpu_us_per_frame": round(1e6 * best / frames, 3), "mb_per_s": round(size * frames / best / 1e6), "loadavg": round(os.getloadavg()[0], 2)}
            runs.append(run)
            lines.append(f"{size:>6} {frames:>9,} {run['cpu_us_per_frame']:>9.3f} {run['mb_per_s']:>7,} {run['loadavg']:>5.2f}")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    benchlib.save("capture_replay" + (f"-{args.label}" if args.label else ""), {"environment": env, "label": args.label, "runs": runs}, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
