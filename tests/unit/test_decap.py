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
        assert meta.description() == "erspan, type III, session id 1023, hardware id 17"  # direction, timestamp: per frame


def test_not_a_tunnel_packet_is_none():
    assert decap_gre(b"\x00") is None
    assert decap_gre(struct.pack("!HH", 0x0001, 0x6558) + INNER) is None  # GRE version 1 (PPTP)
    assert decap_gre(struct.pack("!HH", 0, 0x0800) + INNER) is None  # IP in GRE: no Ethernet frame
    assert decap_vxlan(bytes(8) + INNER) is None  # no I flag
    frame, meta = decap_vxlan(struct.pack("!B3xI", 0x08, 4242 << 8) + INNER)
    assert frame == INNER and meta.vni == 4242


def test_gre_layout_says_which_words_change_per_packet():
    """tunnelblock.py keys a stream by the fixed words: what decap_gre says of a stream must be in them."""
    from vtap_drivers.linux.decap import gre_layout

    def erspan3(flags, key_and_sequence, word3):
        return struct.pack("!HH", flags, 0x22EB) + key_and_sequence + struct.pack("!HHIHH", 0x2000, 5, 99, 0, word3) + INNER

    assert gre_layout(0x1000_22EB) == (20, (2, 4), 1, 3)  # sequence, ERSPAN word 0, timestamp, word 2
    assert gre_layout(0xB000_6558) == (16, (2,), 3, None)  # checksum, key, sequence
    assert gre_layout(0x1000_88BE) == (16, (2, 3), 1, None)
    assert gre_layout(0x0000_88BE) == (4, (), None, None)  # type I
    assert gre_layout(0x0000_0800) is None and gre_layout(0x0001_6558) is None
    for head, payload in ((0x3000_22EB, erspan3(0x3000, struct.pack("!II", 7, 1), 0x118)), (0x1000_22EB, erspan3(0x1000, struct.pack("!I", 1), 0x119))):
        layout = gre_layout(head)
        words = struct.unpack_from(f"!{layout.length // 4}I", payload)
        assert (words[layout.sequence_word], words[layout.timestamp_word]) == (1, 99)
        assert decap_gre(payload)[1].description() == "erspan, type III, session id 5, hardware id 17"
