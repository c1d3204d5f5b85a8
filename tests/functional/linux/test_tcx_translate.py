"""The translated tcx program decides exactly as libpcap's own interpreter does.

Each expression is compiled as vtap compiles it (on a live handle, so libpcap
emits its VLAN ancillary loads), translated, loaded, and run by the kernel
(BPF_PROG_TEST_RUN) on every frame of a corpus; the program's match counter
says whether it matched. The reference is pcap_offline_filter() on the same
classic program.

TEST_RUN builds its skb straight from the bytes: an 802.1Q tag stays in the
frame and the skb has no tag in its metadata. libpcap's interpreter cannot read
skb metadata (it gives up, returning 0, at an ancillary load), so for the
reference the "tag in metadata?" load is replaced by the constant TEST_RUN's skb
holds: 0. The path with the tag in metadata is covered with real frames in
test_tcx_attach.py.
"""

import ctypes
import ctypes.util
import os

import pytest
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from vtap_core import filters
from vtap_drivers.linux import bpfsys, tcxprog

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads eBPF programs (bpf(2))")

NO_SUCH_IFINDEX = 0x7FFFFFF0  # clones fail (counted apart), so a test run sends nothing anywhere
SKF_AD_VLAN_TAG_PRESENT = filters.SKF_AD_OFF + 48

EXPRESSIONS = [
    "tcp port 80", "udp and not port 53", "vlan and tcp", "vlan 10 and ip", "vlan 20", "vlan and ip6 and udp",
    "ip6 and tcp and ip6[53] & 2 != 0", "tcp[tcpflags] & (tcp-syn|tcp-ack) = tcp-syn", "ether multicast",
    "ether broadcast", "ether host 02:00:00:00:00:01", "len <= 100", "greater 1000", "less 64", "ip[2:2] > 576",
    "icmp6", "icmp", "arp", "ip proto 47", "ip[0] & 0xf != 5", "net 10.0.0.0/8", "src net 192.168.0.0/16",
    "portrange 1000-2000", "tcp dst portrange 1000-2000", "ip[2:2] * 3 > 1000", "ip[2:2] / 4 = 15",
    "ip[2:2] % 7 = 3", "ip[2:2] / ip[8] > 5", "ip[2:2] % (ip[8] - 64) = 0", "(ip[2:2] + ip[8]) & 0xff = 0x40",
    "ip[1] ^ 0xff != 0xff", "ip[2:2] << 1 > 200", "tcp[0:2] >> (ip[8] - 30) != 0",
    "ip[2:2] << (ip[8] - 30) != 0", "ip[2:2] / ip[8] = 0", "ip[2:2] % (ip[8] - 64) != 1", "host fe80::1",
    "ip6 dst host 2001:db8::2", "ip host 10.1.2.3", "udp src port 123", "ip and ip[6:2] & 0x1fff != 0",
    "tcp[13] = 2", "not ip", "ip multicast", "ip6 multicast", "udp[8:4] = 0xdeadbeef", "",
]

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def _corpus():
    eth = Ether(src=MAC_A, dst=MAC_B)
    frames = [
        eth / IP(src="10.1.2.3", dst="10.9.9.9") / TCP(sport=4321, dport=80, flags="S"),
        eth / IP(src="10.1.2.4", dst="172.16.0.1") / TCP(sport=80, dport=1500, flags="A"),
        eth / IP(src="192.168.1.1", dst="10.0.0.1", ttl=0) / UDP(sport=5000, dport=53) / Raw(b"q" * 20),
        eth / IP(src="192.168.7.7", dst="8.8.8.8", ttl=64) / UDP(sport=123, dport=123) / Raw(b"\xde\xad\xbe\xef"),
        eth / IP(src="1.2.3.4", dst="5.6.7.8", ttl=40) / UDP(sport=2000, dport=9999) / Raw(b"\xde\xad\xbe\xef" * 3),
        eth / IP(dst="10.1.2.3", ttl=1) / ICMP(),
        eth / IP(src="10.1.2.3", options=b"\x01\x01\x01\x00") / TCP(dport=1999),
        eth / IP(src="10.3.3.3", dst="10.4.4.4", ttl=100) / TCP(sport=1000, dport=22, flags="SA") / Raw(b"x" * 550),
        eth / IP(src="10.3.3.3", dst="10.4.4.4", frag=10, proto=6) / Raw(b"y" * 40),
        eth / IP(src="10.5.5.5", dst="10.6.6.6", ttl=63) / TCP(dport=2000) / Raw(b"z" * 1100),
        eth / IP(src="10.7.7.7", dst="10.8.8.8") / GRE() / IP() / UDP(),
        eth / IP(src="10.7.7.7", dst="10.8.8.8", ttl=65, tos=0x10) / TCP(sport=60000, dport=7),
        eth / IP(src="10.7.7.7", dst="10.8.8.8", ttl=40) / TCP(sport=60001, dport=8),
        eth / IP(src="10.7.7.7", dst="10.8.8.8", ttl=24) / TCP(sport=60002, dport=9),
        Ether(src=MAC_A, dst="01:00:5e:00:00:05") / IP(src="10.1.1.1", dst="224.0.0.5") / UDP(dport=520),
        Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.1.1.1", pdst="10.1.1.2"),
        eth / IPv6(src="fe80::1", dst="fe80::2") / TCP(sport=5555, dport=80, flags="S"),
        eth / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=53, dport=1234),
        eth / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(dport=443, flags="A"),
        Ether(src=MAC_B, dst="33:33:00:00:00:01") / IPv6(src="fe80::9", dst="ff02::1") / ICMPv6EchoRequest(),
        eth / Dot1Q(vlan=10) / IP(src="10.1.2.3") / TCP(dport=80, flags="S"),
        eth / Dot1Q(vlan=20) / IP(src="10.2.2.2") / UDP(dport=53),
        eth / Dot1Q(vlan=20) / IPv6(dst="2001:db8::2") / UDP(dport=1500),
        eth / Dot1Q(vlan=10) / ARP(),
        eth / Dot1Q(vlan=30) / Dot1Q(vlan=10) / IP() / TCP(),
        Ether(src="02:00:00:00:00:07", dst=MAC_B, type=0x88B5) / Raw(b"\x00" * 46),
    ]
    frames = [bytes(frame) for frame in frames]
    # TEST_RUN refuses an IPv4 frame shorter than its IP header (IPv6: 40 bytes); cut after those.
    tcp4, udp4, arp, tcp6, tagged, other = frames[0], frames[3], frames[15], frames[16], frames[20], frames[25]
    truncated = [tcp4[:34], tcp4[:40], tcp4[:47], tcp6[:54], tcp6[:60], tagged[:18], tagged[:30], tagged[:40],
                 arp[:20], udp4[:38], other[:14]]
    return frames + truncated


CORPUS = _corpus()


class _PcapHeader(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


def _libpcap_matches(program, frame: bytes) -> bool:
    lib = ctypes.CDLL(ctypes.util.find_library("pcap") or "libpcap.so.0.8")
    lib.pcap_offline_filter.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
    insns = (filters._BpfInsn * len(program))(*[filters._BpfInsn(*insn) for insn in program])
    compiled = filters._BpfProgram(len(program), insns)
    header = _PcapHeader(0, 0, len(frame), len(frame))
    return lib.pcap_offline_filter(ctypes.byref(compiled), ctypes.byref(header), frame) != 0


def _as_test_run_sees_it(program):
    """The tag-in-metadata load replaced by 0, the value a TEST_RUN skb holds."""
    return tuple(
        filters.Instruction(0x00, 0, 0, 0) if insn.code == 0x30 and insn.k == SKF_AD_VLAN_TAG_PRESENT & 0xFFFFFFFF else insn
        for insn in program
    )


def _kernel_matches(mirror, frame: bytes) -> bool:
    before = mirror.read_counters()["packets"]
    assert bpfsys.run_on_frame(mirror.prog, frame).retval == tcxprog.TCX_NEXT
    return mirror.read_counters()["packets"] == before + 1


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_translation_agrees_with_libpcap(expression):
    program = filters.compile_filter(expression, live=True)
    reference = _as_test_run_sees_it(program)
    with tcxprog.load_mirror(program, NO_SUCH_IFINDEX, "eq") as mirror:
        verdicts = [(_kernel_matches(mirror, frame), _libpcap_matches(reference, frame)) for frame in CORPUS]
        counters = mirror.read_counters()
    disagreements = [index for index, (kernel, pcap) in enumerate(verdicts) if kernel != pcap]
    assert not disagreements, f"{expression!r}: kernel and libpcap disagree on frames {disagreements}: {verdicts}"
    matched = [frame for frame, (kernel, _) in zip(CORPUS, verdicts) if kernel]
    assert counters == {"packets": len(matched), "bytes": sum(map(len, matched)), "clone_failures": len(matched)}


def test_corpus_tells_expressions_apart():
    """The corpus is not trivial: most expressions match some frames and miss others."""
    mixed = 0
    for expression in EXPRESSIONS:
        reference = _as_test_run_sees_it(filters.compile_filter(expression, live=True))
        verdicts = {_libpcap_matches(reference, frame) for frame in CORPUS}
        mixed += verdicts == {True, False}
    assert mixed >= len(EXPRESSIONS) - 3


def test_vlan_programs_do_read_the_tag_from_metadata():
    """vtap's live compile emits the ancillary VLAN load the translator maps to __sk_buff."""
    program = filters.compile_filter("vlan 10 and ip", live=True)
    assert any(insn.k == SKF_AD_VLAN_TAG_PRESENT & 0xFFFFFFFF for insn in program)


def test_sampling_passes_about_one_in_n():
    """SKF_AD_RANDOM becomes bpf_get_prandom_u32(): 1-in-4 of 800 runs lands near 200."""
    program = filters.with_sampling(filters.compile_filter("", live=True), 4)
    frame = CORPUS[0]
    with tcxprog.load_mirror(program, NO_SUCH_IFINDEX, "sample") as mirror:
        for _ in range(800):
            bpfsys.run_on_frame(mirror.prog, frame)
        passed = mirror.read_counters()["packets"]
    assert 120 <= passed <= 280, passed


def test_a_verifier_refusal_carries_the_log():
    bad = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # exit without setting r0
    with pytest.raises(OSError, match="(?s)verifier: .*R0"):
        bpfsys.load_program(bad, "vtap_bad")


def _ancillary_equals(offset: int, value: int):
    """A hand-written classic program: match when ancillary value `offset` equals `value`."""
    return [(0x28, 0, 0, (filters.SKF_AD_OFF + offset) & 0xFFFFFFFF), (0x15, 0, 1, value), (0x06, 0, 0, 1), (0x06, 0, 0, 0)]


# (ancillary offset, frame, its value in a TEST_RUN skb: built on this namespace's "lo", tag kept in the frame)
ANCILLARY_CASES = [
    ("protocol is host order", 0, CORPUS[0], 0x0800),
    ("protocol ipv6", 0, CORPUS[16], 0x86DD),
    ("protocol of a tagged frame", 0, CORPUS[20], 0x8100),
    ("pkttype otherhost", 4, CORPUS[0], 3),
    ("pkttype host (lo's address)", 4, bytes(Ether(src=MAC_A, dst="00:00:00:00:00:00") / IP() / UDP()), 0),
    ("pkttype multicast", 4, CORPUS[14], 2),
    ("ifindex of lo", 8, CORPUS[0], 1),
    ("no tag in metadata", 48, CORPUS[20], 0),
    ("no tci", 44, CORPUS[20], 0),
    ("no tpid", 60, CORPUS[20], 0),
]


@pytest.mark.parametrize("what, offset, frame, value", ANCILLARY_CASES, ids=[case[0] for case in ANCILLARY_CASES])
def test_ancillary_loads_read_the_skb(what, offset, frame, value):
    with tcxprog.load_mirror(_ancillary_equals(offset, value), NO_SUCH_IFINDEX, "anc") as mirror:
        assert _kernel_matches(mirror, frame)
    with tcxprog.load_mirror(_ancillary_equals(offset, value + 1), NO_SUCH_IFINDEX, "anc") as mirror:
        assert not _kernel_matches(mirror, frame)


LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_W_IND, LD_B_IND, LDX_IMM, LDXB_MSH, RET_K = 0x20, 0x28, 0x30, 0x40, 0x50, 0x01, 0xB1, 0x06


def _loaded_then_matches(*loads):
    """A hand-written classic program: the loads, then "match" (so it matches iff every load is in the packet)."""
    return [*loads, (RET_K, 0, 0, 1)]


# Loads at the edges of what the translation reads directly (the verifier bounds a packet
# pointer's offset to 0xffff; the load instruction's offset to 0x7fff) and X + k wrapping.
EDGE_PROGRAMS = {
    "byte at 0": _loaded_then_matches((LD_B_ABS, 0, 0, 0)),
    "word at 0x7ffc": _loaded_then_matches((LD_W_ABS, 0, 0, 0x7FFC)),
    "half at 0x7fff": _loaded_then_matches((LD_H_ABS, 0, 0, 0x7FFF)),
    "word at 0xfffb": _loaded_then_matches((LD_W_ABS, 0, 0, 0xFFFB)),
    "byte at 0xffff": _loaded_then_matches((LD_B_ABS, 0, 0, 0xFFFF)),
    "word at 0x10000": _loaded_then_matches((LD_W_ABS, 0, 0, 0x10000)),
    "last byte of the 1148-byte frame": _loaded_then_matches((LD_B_ABS, 0, 0, 1147)),
    "word ending at byte 1148": _loaded_then_matches((LD_W_ABS, 0, 0, 1144)),
    "word one past it": _loaded_then_matches((LD_W_ABS, 0, 0, 1145)),
    "x + k in the packet": _loaded_then_matches((LDX_IMM, 0, 0, 1100), (LD_W_IND, 0, 0, 40)),
    "x + k one past": _loaded_then_matches((LDX_IMM, 0, 0, 1100), (LD_W_IND, 0, 0, 45)),
    "x beyond 0xffff": _loaded_then_matches((LDX_IMM, 0, 0, 0x10000), (LD_B_IND, 0, 0, 0)),
    "msh then x + k": _loaded_then_matches((LDXB_MSH, 0, 0, 14), (LD_W_IND, 0, 0, 1100)),
}


@pytest.mark.parametrize("name", EDGE_PROGRAMS)
def test_load_edges_agree_with_libpcap(name):
    program = EDGE_PROGRAMS[name]
    frames = CORPUS + [bytes(Ether(src=MAC_A, dst=MAC_B) / IP() / UDP() / Raw(b"e" * (1148 - 42)))]
    with tcxprog.load_mirror(program, NO_SUCH_IFINDEX, "edge") as mirror:
        verdicts = [(_kernel_matches(mirror, frame), _libpcap_matches(program, frame)) for frame in frames]
    assert all(kernel == pcap for kernel, pcap in verdicts), f"{name}: (kernel, libpcap) per frame: {verdicts}"


def test_x_plus_k_wraps_as_a_u32_as_in_the_kernel():
    """X + k past 2^32 loads at the wrapped offset, as the kernel's classic BPF (the cls_bpf path) does.

    libpcap's interpreter refuses such a load instead; its compiler does not emit one.
    """
    program = _loaded_then_matches((LDX_IMM, 0, 0, 0xFFFFFFF4), (LD_W_IND, 0, 0, 16), (0x15, 1, 0, 0x00020200), (RET_K, 0, 0, 0))
    wrapped_to_4 = [frame for frame in CORPUS if frame[4:8] == bytes.fromhex("00020200")]
    assert wrapped_to_4 and len(wrapped_to_4) < len(CORPUS)
    with tcxprog.load_mirror(program, NO_SUCH_IFINDEX, "wrap") as mirror:
        assert [frame for frame in CORPUS if _kernel_matches(mirror, frame)] == wrapped_to_4
