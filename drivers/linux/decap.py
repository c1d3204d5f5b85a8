"""Decapsulators: pure functions from a tunnel packet's bytes to (inner frame, metadata).

    decap_gre(payload)    the IP payload of a GRE packet (IP protocol 47):
                          gretap (0x6558), ERSPAN type I/II (0x88BE), type III (0x22EB)
    decap_vxlan(payload)  the UDP payload of a VXLAN packet (RFC 7348)
    gre_layout(head)      which words of a GRE header name the stream, which change per packet

Each returns (frame, Meta) or None when the bytes are not such a packet (or
carry something other than an Ethernet frame). Given a memoryview, the frame
is a view into it (no copy). Formats: RFC 2784/2890 (GRE,
key and sequence), draft-foschiano-erspan (ERSPAN type I/II/III headers).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

GRE_C, GRE_K, GRE_S = 0x8000, 0x2000, 0x1000
PROTO_TEB = 0x6558  # transparent Ethernet bridging: gretap
PROTO_ERSPAN = 0x88BE  # type I (no sequence number) and type II
PROTO_ERSPAN3 = 0x22EB
DESCRIPTION_LABELS = ("session id ", "hardware id ", "key ", "vni ")


class Meta(NamedTuple):  # a tuple, not a frozen dataclass: made once per packet, this is 3x quicker
    tunnel: str  # gre | erspan | vxlan
    key: int | None = None  # the GRE key (gretap)
    vni: int | None = None
    erspan_version: int | None = None  # 1 (type I), 2 (type II), 3 (type III)
    session_id: int | None = None  # ERSPAN
    direction: str | None = None  # ERSPAN type III: "ingress" or "egress" (at the mirrored port, as ERSPAN says)
    hardware_id: int | None = None  # ERSPAN type III
    timestamp: int | None = None  # ERSPAN type III, in the sender's granularity
    sequence: int | None = None  # GRE sequence number

    def description(self) -> str:
        """One line naming the stream (what is the same for each of its packets): a pcapng interface's description.

        Direction, timestamp and sequence number change per packet: tunnelblock.py writes them in each
        frame's epb_flags, comment and epb_packetid.
        """
        parts = [self.tunnel]
        if self.erspan_version:
            parts.append(("type I", "type II", "type III")[self.erspan_version - 1])
        for label, value in zip(DESCRIPTION_LABELS, (self.session_id, self.hardware_id, self.key, self.vni)):
            if value is not None:
                parts.append(label + str(value))
        return ", ".join(parts)


def decap_gre(payload: bytes):
    if len(payload) < 4:
        return None
    flags, proto = struct.unpack_from("!HH", payload)
    if flags & 0x0007:  # GRE version must be 0
        return None
    offset, key, sequence = 4, None, None
    if flags & GRE_C:
        offset += 4
    if flags & GRE_K:
        if len(payload) < offset + 4:
            return None
        key = struct.unpack_from("!I", payload, offset)[0]
        offset += 4
    if flags & GRE_S:
        if len(payload) < offset + 4:
            return None
        sequence = struct.unpack_from("!I", payload, offset)[0]
        offset += 4
    if proto == PROTO_TEB:
        return payload[offset:], Meta("gre", key=key, sequence=sequence)
    if proto == PROTO_ERSPAN and not flags & GRE_S:  # type I: no ERSPAN header at all
        return payload[offset:], Meta("erspan", erspan_version=1, sequence=sequence)
    if proto == PROTO_ERSPAN:
        if len(payload) < offset + 8:
            return None
        word0, word1 = struct.unpack_from("!HH", payload, offset)
        if word0 >> 12 != 1:
            return None
        return payload[offset + 8 :], Meta("erspan", erspan_version=2, session_id=word1 & 0x3FF, sequence=sequence)
    if proto == PROTO_ERSPAN3:
        if len(payload) < offset + 12:
            return None
        word0, word1, timestamp, _sgt, word3 = struct.unpack_from("!HHIHH", payload, offset)
        if word0 >> 12 != 2:
            return None
        header = 12 + (8 if word3 & 1 else 0)  # O bit: an 8-byte platform-specific subheader follows
        meta = Meta(
            "erspan",
            erspan_version=3,
            session_id=word1 & 0x3FF,
            timestamp=timestamp,
            hardware_id=(word3 >> 4) & 0x3F,
            direction="egress" if word3 & 0x8 else "ingress",
            sequence=sequence,
        )
        return payload[offset + header :], meta
    return None


def decap_vxlan(payload: bytes):
    if len(payload) < 8:
        return None
    flags, vni_field = struct.unpack_from("!B3xI", payload)
    if not flags & 0x08:
        return None
    return payload[8:], Meta("vxlan", vni=vni_field >> 8)


class GreLayout(NamedTuple):
    """Where the 32-bit words of a GRE (+ ERSPAN) header of given flags and protocol are (tunnelblock.py
    reads the ring with them): those the same for every packet of a stream, and those that change."""

    length: int  # bytes of GRE (+ ERSPAN) header
    fixed_words: tuple  # indexes of the words that are the same for every packet of a stream
    sequence_word: int | None  # the GRE sequence number
    timestamp_word: int | None  # the ERSPAN type III timestamp


def gre_layout(head: int):
    """The GreLayout of GRE packets whose first word (flags, protocol) is head; None: not a layout it knows."""
    flags, proto = head >> 16, head & 0xFFFF
    if flags & 0x0007 or proto not in (PROTO_TEB, PROTO_ERSPAN, PROTO_ERSPAN3):
        return None
    count, fixed, sequence, timestamp = 1, [], None, None
    if flags & GRE_C:
        count += 1  # the checksum: changes per packet, says nothing about the stream
    if flags & GRE_K:
        fixed.append(count)
        count += 1
    if flags & GRE_S:
        sequence = count
        count += 1
    if proto == PROTO_ERSPAN and flags & GRE_S:
        fixed += [count, count + 1]
        count += 2
    elif proto == PROTO_ERSPAN3:
        fixed += [count, count + 2]
        timestamp = count + 1
        count += 3
    return GreLayout(4 * count, tuple(fixed), sequence, timestamp)
