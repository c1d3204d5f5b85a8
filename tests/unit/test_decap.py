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
