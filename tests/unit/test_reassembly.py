"""IPv4 reassembly of fragmented tunnel packets, on fragments scapy cuts (the functional test sends them for real)."""

import random
import struct

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


def whole_and_fragments6(size=3000, ident=7, fragsize=1280):
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6

    udp = UDP(sport=1, dport=4789) / bytes(random.Random(ident).randbytes(size))
    whole = IPv6(src="fd00::1", dst="fd00::2") / udp
    pieces = fragment6(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(id=ident) / udp, fragsize)
    return bytes(whole), [bytes(f) for f in pieces]


def test_ipv6_fragments_in_any_order_give_the_packet_without_its_fragment_header():
    whole, pieces = whole_and_fragments6()
    assert len(pieces) == 3 and all(p[6] == 44 for p in pieces)
    for order in (pieces, pieces[::-1], pieces[1:] + pieces[:1]):
        joiner = Reassembly()
        results = [joiner.add6(memoryview(p)) for p in order]
        assert results[:-1] == [None] * (len(order) - 1)
        assert results[-1] == whole and joiner.pending == {}  # next header UDP, payload length of the whole


def test_ipv6_interleaved_a_missing_fragment_a_duplicate_and_the_same_id_from_ipv4():
    first, pieces1 = whole_and_fragments6(ident=1)
    second, pieces2 = whole_and_fragments6(ident=2)
    joiner = Reassembly()
    out = [joiner.add6(p) for pair in zip(pieces1, pieces2) for p in pair]
    assert [o for o in out if o] == [first, second]
    _, pieces3 = whole_and_fragments6(ident=3)
    assert [joiner.add6(p) for p in pieces3[:1] + pieces3[2:]] == [None] * 2  # one missing: nothing yet
    _, pieces4 = whole_and_fragments6(ident=4)
    assert [joiner.add6(p) for p in (pieces4[0], pieces4[0], *pieces4[1:])] == [None] * 4  # duplicate: spoilt
    whole4, pieces4 = whole_and_fragments(ident=3)  # an IPv4 packet with the pending IPv6 one's id
    assert [joiner.add(p) for p in pieces4][-1][20:] == whole4[20:]
    assert joiner.add6(pieces3[1])[40:] == whole_and_fragments6(ident=3)[0][40:]


def test_an_ipv6_fragment_too_short_for_its_fragment_header_is_dropped():
    _, pieces = whole_and_fragments6()
    assert Reassembly().add6(pieces[0][:44]) is None


def test_ipv6_extension_headers_before_the_fragment_header_are_walked():
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6

    from vtap_drivers.linux.reassembly import upper_layer6

    udp = UDP(sport=1, dport=4789) / bytes(random.Random(5).randbytes(3000))
    chain = IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[], segleft=0)
    pieces = [bytes(p) for p in fragment6(chain / IPv6ExtHdrFragment(id=9) / udp, 1280)]
    assert [upper_layer6(p) for p in pieces] == [(44, 40 + 8 + 8 + 8)] * len(pieces)
    joiner = Reassembly()
    results = [joiner.add6(p, 64) for p in pieces[::-1]]
    assert results[-1] == bytes(IPv6(src="fd00::1", dst="fd00::2") / udp) and joiner.pending == {}
    assert upper_layer6(bytes(chain / udp)) == (17, 64)
    assert upper_layer6(bytes(chain)[:50]) == (None, 0)  # cut short inside the chain
    seven = bytes(chain / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / udp)
    assert upper_layer6(seven) == (None, 0)  # more than it walks
    assert upper_layer6(bytes(chain / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / udp)) == (17, 88)  # six: the most


def authentication_header(next_header, payload=b""):
    """RFC 4302: 24 bytes (a 12-byte ICV), its length field 4 (in 4 octets, less 2): not IPv6's 8-octet unit."""
    return struct.pack("!BBHII", next_header, 4, 0, 0x1234, 1) + bytes(12) + payload


def test_ah_and_the_headers_after_the_fragment_header_are_walked():
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6
    from scapy.packet import Raw

    from vtap_drivers.linux.reassembly import upper_layer4, upper_layer6

    udp = bytes(UDP(sport=1, dport=4789) / bytes(random.Random(6).randbytes(3000)))
    assert upper_layer6(bytes(IPv6(nh=51) / Raw(authentication_header(17, udp)))) == (17, 64)
    assert upper_layer4(bytes(IP(proto=51) / Raw(authentication_header(17, udp)))) == (17, 44)
    assert upper_layer4(bytes(IP(proto=17) / udp)) == (17, 20)
    # AH and destination options after the Fragment header: in the first fragment; joined, they lead the payload.
    fragmentable = authentication_header(60, bytes(IPv6ExtHdrDestOpt(nh=17)) + udp)
    pieces = [bytes(p) for p in fragment6(IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=3, nh=51) / Raw(fragmentable), 1280)]
    assert len(pieces) == 3 and [upper_layer6(p) for p in pieces] == [(44, 48)] * 3
    joiner = Reassembly()
    joined = [joiner.add6(p, 48) for p in pieces[::-1]][-1]
    assert upper_layer6(joined) == (17, 40 + 24 + 8) and joined[72:] == udp
    # ESP is not walked (what follows its header is encrypted); a header cut short ends the walk.
    assert upper_layer6(bytes(IPv6(nh=50) / Raw(bytes(8) + udp))) == (50, 40)
    assert upper_layer4(bytes(IP(proto=50) / Raw(bytes(8) + udp))) == (50, 20)
    assert upper_layer6(bytes(IPv6(nh=51) / Raw(authentication_header(17)[:6]))) == (None, 0)
    assert upper_layer4(bytes(IP(proto=51) / Raw(authentication_header(17)[:6]))) == (None, 0)
