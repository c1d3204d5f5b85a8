"""IPv4 reassembly of fragmented tunnel packets, on fragments scapy cuts (the functional test sends them for real)."""

import random

from scapy.layers.inet import IP, UDP, fragment

from vtap_drivers.linux.reassembly import Reassembly


def whole_and_fragments(size=3000, ident=7, fragsize=1000):
    packet = IP(src="10.0.0.1", dst="10.0.0.2", id=ident, flags=0) / UDP(sport=1, dport=4789) / bytes(random.Random(ident).randbytes(size))
    return bytes(packet), [bytes(f) for f in fragment(packet, fragsize=fragsize)]


def test_fragments_in_any_order_give_the_whole_packet_once():
    whole, pieces = whole_and_fragments()
    assert len(pieces) == 4
    for order in (pieces, pieces[::-1], pieces[2:] + pieces[:2]):
        joiner = Reassembly()
        results = [joiner.add(memoryview(p)) for p in order]
        assert results[:-1] == [None] * (len(order) - 1)
        assert results[-1][20:] == whole[20:] and results[-1][:2] == whole[:2] and joiner.pending == {}


def test_interleaved_packets_a_missing_fragment_and_a_duplicate():
    first, pieces1 = whole_and_fragments(ident=1)
    second, pieces2 = whole_and_fragments(ident=2)
    joiner = Reassembly()
    out = [joiner.add(p) for pair in zip(pieces1, pieces2) for p in pair]
    assert [o[20:] for o in out if o] == [first[20:], second[20:]]
    _, pieces3 = whole_and_fragments(ident=3)
    assert [joiner.add(p) for p in pieces3[:-2] + pieces3[-1:]] == [None] * 3  # one missing: nothing yet
    _, pieces4 = whole_and_fragments(ident=4)
    assert [joiner.add(p) for p in (pieces4[0], pieces4[0], *pieces4[1:])] == [None] * 5  # duplicate: spoilt
