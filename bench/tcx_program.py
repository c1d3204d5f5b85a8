"""The translated tcx program's own cost per packet: ns per run under BPF_PROG_TEST_RUN.

For each filter and frame: the translation before issue 11 (every packet load a
bpf_skb_load_bytes() call; taken from git, --before), today's translation
(direct loads from the linear part), and for "udp port 7" the hand-assembled
LD_ABS program of bench/onestep_bpf.py and an empty program (what running any
program costs). The kernel's own figure: TEST_RUN's duration with repeat=N
(ns per run, averaged by the kernel); rounds interleave the programs, the
report gives the median and the minimum over rounds. Copies go to an ifindex
that does not exist, so nothing is sent. Needs root.

    python3 bench/tcx_program.py [--rounds 9] [--repeat 200000] [--before REF]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import statistics
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import onestep_bpf  # noqa: E402
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from vtap_core import filters  # noqa: E402
from vtap_drivers.linux import bpfsys, tcxprog  # noqa: E402

BEFORE_REF = "3ee4ef6"  # main before issue 11: the helper-call-only translation
NO_SUCH_IFINDEX = 0x7FFFFFF0
FILTERS = ("udp port 7", "tcp dst port 443 and net 10.0.0.0/8", "vlan and udp")
MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"
FRAMES = {
    "bench 64B 0x88b5": bytes(Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / Raw(b"\x00" * 50)),
    "tcp4 syn": bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.1.2.3", dst="10.9.9.9") / TCP(dport=443, flags="S")),
    "udp4 dns": bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.168.1.1", dst="8.8.8.8") / UDP(sport=5353, dport=53) / Raw(b"q" * 30)),
    "udp6": bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(dport=7) / Raw(b"u" * 20)),
    "tagged udp4": bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=10) / IP(src="10.2.2.2", dst="10.3.3.3") / UDP(dport=9)),
    "tcp4 1514B": bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.5.5.5", dst="10.6.6.6") / TCP(dport=443, flags="A") / Raw(b"z" * 1460)),
}


def old_translator(ref: str):
    """tcxprog.py as it was at `ref` (None when git cannot show it)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = subprocess.run(["git", "-C", repo, "show", f"{ref}:drivers/linux/tcxprog.py"], capture_output=True, text=True)
    if shown.returncode:
        return None
    spec = importlib.util.spec_from_loader("tcxprog_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(shown.stdout, f"{ref}:tcxprog.py", "exec"), module.__dict__)
    return module


def ns_per_run(prog_fd: int, frame: bytes, repeat: int) -> int:
    """BPF_PROG_TEST_RUN with repeat: the kernel's average duration of one run, in ns."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = struct.pack("=IIIIQQII", prog_fd, 0, len(frame), len(data_out), ctypes.addressof(data_in), ctypes.addressof(data_out), repeat, 0)
    _, buffer = bpfsys.bpf(bpfsys.PROG_TEST_RUN, attr)
    retval, _, _, _, _, _, duration = struct.unpack_from("=IIIQQII", buffer.raw, 4)
    if ctypes.c_int32(retval).value != tcxprog.TCX_NEXT:
        raise RuntimeError(f"a program returned {retval}, not TCX_NEXT")
    return duration


def programs(expression: str, before, counters) -> dict:
    """{name: fd} for one filter."""
    classic = filters.compile_filter(expression, live=True)
    out = {"vtap translation": bpfsys.load_program(tcxprog.translate(classic, counters.fileno(), NO_SUCH_IFINDEX), "vtap_bench")}
    if before is not None:
        out["before (helper loads)"] = bpfsys.load_program(before.translate(classic, counters.fileno(), NO_SUCH_IFINDEX), "vtap_bench0")
    if expression == "udp port 7":
        out["hand-made LD_ABS"] = bpfsys.BpfFd(onestep_bpf.load(onestep_bpf.program(NO_SUCH_IFINDEX, 7)))
        out["empty"] = bpfsys.BpfFd(onestep_bpf.load(onestep_bpf.program(None, None)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=200000)
    parser.add_argument("--before", default=BEFORE_REF, help="git ref of the translation to compare with")
    args = parser.parse_args()
    before = old_translator(args.before)
    counters = bpfsys.create_percpu_array("vtap_bench", 8 * len(tcxprog.COUNTERS))
    results, lines = [], []
    lines.append(f"translated tcx program, ns per run (BPF_PROG_TEST_RUN, repeat={args.repeat}, {args.rounds} rounds: median / min)")
    if before is None:
        lines.append(f"(no 'before' figures: git cannot show {args.before}:drivers/linux/tcxprog.py)")
    for expression in FILTERS:
        loaded = programs(expression, before, counters)
        lines.append(f"\nfilter {expression!r}")
        lines.append(f"  {'frame':<18}" + "".join(f"{name:>24}" for name in loaded))
        for frame_name, frame in FRAMES.items():
            samples = {name: [] for name in loaded}
            for _ in range(args.rounds):
                for name, fd in loaded.items():
                    samples[name].append(ns_per_run(fd.fileno(), frame, args.repeat))
            row = {name: {"median_ns": statistics.median(values), "min_ns": min(values), "samples": values} for name, values in samples.items()}
            results.append({"filter": expression, "frame": frame_name, "frame_bytes": len(frame), "programs": row})
            lines.append(f"  {frame_name:<18}" + "".join(f"{r['median_ns']:>17.0f} / {r['min_ns']:<4}" for r in row.values()))
        for fd in loaded.values():
            fd.close()
    counters.close()
    lines.append("\nbefore: every packet load a bpf_skb_load_bytes() call; vtap translation: direct loads, the helper only past data_end")
    lines.append("hand-made LD_ABS / empty: bench/onestep_bpf.py (not vtap; LD_ABS is not usable by vtap, see tcxprog.py)")
    text = "\n".join(lines)
    print(text)
    benchlib.save("tcx_program", {"environment": benchlib.environment(), "repeat": args.repeat, "rounds": args.rounds, "before_ref": args.before, "results": results}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
