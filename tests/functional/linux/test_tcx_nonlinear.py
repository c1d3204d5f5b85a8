"""The translated program's slow path: frames whose headers are not in the skb's linear part.

TEST_RUN builds linear skbs only, so this is a real hook. An AF_PACKET send of
a frame bigger than a page puts only the link-layer header in the linear part
and the rest in page fragments (packet_alloc_skb()); over a veth the skb stays
so, and at src0's tcx ingress data_end is 14 bytes past data. Every load of
the IP and UDP headers then goes through bpf_skb_load_bytes(). A probe
program after vtap's counts the frames whose linear part is shorter than 64
bytes: it shows the frames really were non-linear there.
"""

import os
import socket

import pytest
from pyroute2 import netns as pr_netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from vtap_core import filters
from vtap_drivers.linux import bpfsys, tcxprog
from vtap_drivers.linux.tcxprog import (ADD, ALU64_K, CALL, CTX, EXIT, FP, JEQ_K, JGT_X, LD_IMM64, LDX_DW, LDX_W, MAP_LOOKUP_ELEM, MOV64_K,
                                        MOV64_X, PSEUDO_MAP_FD, R0, R1, R2, R3, SKB_DATA, SKB_DATA_END, ST_W, STX_DW, _Asm)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and eBPF programs")

MTU = 9000
FRAME_BYTES = 5000  # more than a page: AF_PACKET makes the skb non-linear
SHORT_LINEAR = 64


def big_frames(marker: bytes, dport: int, count: int) -> list[bytes]:
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000, dport=dport)
    payload = marker + b"n" * (FRAME_BYTES - len(frame) - len(marker))
    return [bytes(frame / Raw(payload))] * count


def short_linear_probe(counters_fd: int) -> bytes:
    """Counts (map slot 0) the packets with fewer than SHORT_LINEAR bytes between data and data_end."""
    asm = _Asm()
    asm(MOV64_X, CTX, R1)
    asm(LDX_W, R2, CTX, SKB_DATA)
    asm(LDX_W, R3, CTX, SKB_DATA_END)
    asm(ALU64_K | ADD, R2, imm=SHORT_LINEAR)
    asm(JGT_X, R2, R3, off="short")
    asm(MOV64_K, R0, imm=tcxprog.TCX_NEXT)
    asm(EXIT)
    asm.label("short")
    asm(ST_W, FP, off=-8, imm=0)
    asm(LD_IMM64, R1, PSEUDO_MAP_FD, imm=counters_fd)
    asm(MOV64_X, R2, FP)
    asm(ALU64_K | ADD, R2, imm=-8)
    asm(CALL, imm=MAP_LOOKUP_ELEM)
    asm(JEQ_K, R0, off="out", imm=0)
    asm(LDX_DW, R1, R0, 0)
    asm(ALU64_K | ADD, R1, imm=1)
    asm(STX_DW, R0, R1, 0)
    asm.label("out")
    asm(MOV64_K, R0, imm=tcxprog.TCX_NEXT)
    asm(EXIT)
    return asm.assemble()


@pytest.fixture
def inside(lab):
    lab.standard()
    for device in ("src0", "peer0", "mon0", "mon1"):
        lab.ip("link", "set", device, "mtu", str(MTU))
    pr_netns.pushns(lab.netns)
    try:
        yield lab
    finally:
        pr_netns.popns()


def test_headers_in_page_fragments_are_read_through_the_helper(inside):
    lab = inside
    src0, mon0 = socket.if_nametoindex("src0"), socket.if_nametoindex("mon0")
    marker = new_marker()
    wanted, others = big_frames(marker, 9, 4), big_frames(marker, 10, 3)
    with tcxprog.load_mirror(filters.compile_filter("udp port 9"), mon0, "nonlin") as mirror, \
            bpfsys.create_percpu_array("vtap_probe", 8) as probe_counters, \
            bpfsys.load_program(short_linear_probe(probe_counters.fileno()), "vtap_probe") as probe, \
            bpfsys.attach_tcx(mirror.prog, src0, "ingress"), bpfsys.attach_tcx(probe, src0, "ingress"):
        sock = lab.packet_socket("mon1")
        try:
            lab.send("peer0", wanted + others)
            copies = receive(sock, marker)
        finally:
            sock.close()
        assert bpfsys.read_percpu_u64(probe_counters, 0, 1) == [len(wanted + others)]  # all non-linear at the hook
        assert copies == wanted  # whole and unchanged
        assert mirror.read_counters() == {"packets": 4, "bytes": 4 * FRAME_BYTES, "clone_failures": 0}
