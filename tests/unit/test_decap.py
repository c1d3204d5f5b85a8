"""Decapsulators on hand-built tunnel payloads (the lane checks them against the kernel's own packets)."""

import struct

from vtap_drivers.linux.decap import decap_gre, decap_vxlan

INNER = bytes(range(64))


def test_gretap_with_key_and_sequence():
    payload = struct.pack("!HHII", 0x3000, 0x6558, 7, 42) + INNER
    frame, meta = decap_gre(payload)
    assert frame == INNER and (meta.tunnel, meta.key, meta.sequence) == ("gre", 7, 42)


def test_erspan_type_i_ii_iii():
    type1 = struct.pack("!HH", 0x0000, 0x88BE) + INNER
    assert decap_gre(type1)[1].erspan_version == 1 and decap_gre(type1)[0] == INNER
    type2 = struct.pack("!HHI", 0x1000, 0x88BE, 1) + struct.pack("!HHI", 0x1000, 0x0005 | 0x1800, 9) + INNER
    frame, meta = decap_gre(type2)
    assert frame == INNER and (meta.erspan_version, meta.session_id) == (2, 5)
    for o_bit, extra in ((0, b""), (1, bytes(8))):
        word3 = (0x3F & 17) << 4 | 0x8 | o_bit  # hardware id 17, egress
        type3 = struct.pack("!HHI", 0x1000, 0x22EB, 1) + struct.pack("!HHIHH", 0x2000, 1023, 123456, 0, word3) + extra + INNER
        frame, meta = decap_gre(type3)
        assert frame == INNER
        assert (meta.erspan_version, meta.session_id, meta.direction, meta.hardware_id, meta.timestamp) == (3, 1023, "egress", 17, 123456)
        assert "session id 1023" in meta.comment() and "direction egress" in meta.comment()


def test_not_a_tunnel_packet_is_none():
    assert decap_gre(b"\x00") is None
    assert decap_gre(struct.pack("!HH", 0x0001, 0x6558) + INNER) is None  # GRE version 1 (PPTP)
    assert decap_gre(struct.pack("!HH", 0, 0x0800) + INNER) is None  # IP in GRE: no Ethernet frame
    assert decap_vxlan(bytes(8) + INNER) is None  # no I flag
    frame, meta = decap_vxlan(struct.pack("!B3xI", 0x08, 4242 << 8) + INNER)
    assert frame == INNER and meta.vni == 4242


def test_stream_decap_gives_what_decap_gre_and_comment_give():
    """The terminator's cached path against the plain decapsulator, packet by packet."""
    from vtap_drivers.linux.decap import StreamDecap

    def erspan3(session, timestamp, sequence, word3, extra=b""):
        return struct.pack("!HHI", 0x1000, 0x22EB, sequence) + struct.pack("!HHIHH", 0x2000, session, timestamp, 0, word3) + extra + INNER

    packets = [
        erspan3(5, 100, 1, 0x118),
        erspan3(5, 101, 2, 0x118),
        erspan3(5, 102, 3, 0x110),  # ingress now
        erspan3(6, 103, 4, 0x119, bytes(8)),  # O bit: a platform subheader
        erspan3(6, 104, 5, 0x119, bytes(8)),
        struct.pack("!HHI", 0x1000, 0x88BE, 9) + struct.pack("!HHI", 0x1000, 7, 0) + INNER,
        struct.pack("!HHI", 0x1000, 0x88BE, 10) + struct.pack("!HHI", 0x1000, 7, 0) + INNER,
        struct.pack("!HHI", 0x1000, 0x88BE, 11) + struct.pack("!HHI", 0x2000, 7, 0) + INNER,  # not type II
        struct.pack("!HH", 0x0000, 0x88BE) + INNER,
        struct.pack("!HHII", 0x3000, 0x6558, 7, 42) + INNER,
        struct.pack("!HHII", 0x3000, 0x6558, 7, 43) + INNER,
        struct.pack("!HHIII", 0xB000, 0x6558, 0x1234, 8, 44) + INNER,  # checksum, key, sequence
        struct.pack("!HHIII", 0xB000, 0x6558, 0x4321, 8, 45) + INNER,
        struct.pack("!HHI", 0x2000, 0x6558, 9) + INNER,
        struct.pack("!HHII", 0x3000, 0x22EB, 7, 1) + struct.pack("!HHIHH", 0x2000, 1, 2, 0, 0x8) + INNER,  # key + type III
        struct.pack("!HHI", 0x1000, 0x22EB, 1) + b"\x20\x00",  # cut short
        struct.pack("!HH", 0x0001, 0x6558) + INNER,
        struct.pack("!HH", 0, 0x0800) + INNER,
        b"\x00",
    ]
    stream = StreamDecap()
    for payload in packets * 2:  # the second time round, from what it learnt
        for given in (payload, memoryview(payload)):
            expected = decap_gre(given)
            got = stream(given)
            if expected is None:
                assert got is None, payload
                continue
            assert bytes(got[0]) == bytes(expected[0]) and got[2] == expected[1].comment(), payload
            assert got[1] == expected[1]._replace(sequence=None, timestamp=None)
    vxlan = StreamDecap(vxlan=True)
    for payload in (struct.pack("!B3xI", 0x08, 42 << 8) + INNER, bytes(8) + INNER) * 2:
        expected = decap_vxlan(payload)
        got = vxlan(payload)
        assert (got is None) == (expected is None)
        if got:
            assert got[0] == expected[0] and got[2] == expected[1].comment() == "vxlan, vni 42"
