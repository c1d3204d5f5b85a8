"""Decapsulators: pure functions from a tunnel packet's bytes to (inner frame, metadata).

    decap_gre(payload)    the IP payload of a GRE packet (IP protocol 47):
                          gretap (0x6558), ERSPAN type I/II (0x88BE), type III (0x22EB)
    decap_vxlan(payload)  the UDP payload of a VXLAN packet (RFC 7348)

Each returns (frame, Meta) or None when the bytes are not such a packet (or
carry something other than an Ethernet frame). Given a memoryview, the frame
is a view into it (no copy). Formats: RFC 2784/2890 (GRE,
key and sequence), draft-foschiano-erspan (ERSPAN type I/II/III headers).
"""

from __future__ import annotations

import operator
import struct
from typing import NamedTuple

GRE_C, GRE_K, GRE_S = 0x8000, 0x2000, 0x1000
PROTO_TEB = 0x6558  # transparent Ethernet bridging: gretap
PROTO_ERSPAN = 0x88BE  # type I (no sequence number) and type II
PROTO_ERSPAN3 = 0x22EB
COMMENT_LABELS = ("session id ", "direction ", "hardware id ", "timestamp ", "key ", "vni ", "sequence ")


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

    def comment(self) -> str:
        """One line for a pcapng packet comment: what the tunnel said about this frame."""
        parts = [self.tunnel]
        if self.erspan_version:
            parts.append(("type I", "type II", "type III")[self.erspan_version - 1])
        for label, value in zip(COMMENT_LABELS, (self.session_id, self.direction, self.hardware_id, self.timestamp, self.key, self.vni, self.sequence)):
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


class StreamDecap:
    """decap_gre (or decap_vxlan) for the packets of one terminated stream, each with its comment.

    Packets of a stream differ only in the GRE checksum and sequence number and the ERSPAN
    type III timestamp: the rest of the header is parsed once (by decap_gre) and looked up by
    its other 32-bit words. Calling it returns (frame, Meta without sequence and timestamp,
    comment) or None.
    """

    def __init__(self, vxlan: bool = False):
        self.vxlan = vxlan
        self.layouts = {}  # GRE flags + protocol -> _Layout, or None: not cached
        self.known = {}  # (first word, fixed words) -> (inner frame offset, Meta, comment without sequence/timestamp) or None

    def __call__(self, payload):
        if self.vxlan:
            layout, key = None, bytes(payload[:8])
        else:
            if len(payload) < 4:
                return None
            head = _WORD.unpack_from(payload)[0]
            layout = self.layouts.get(head, False)
            if layout is False:
                layout = self.layouts[head] = _gre_layout(head)
            if layout is None or len(payload) < layout.length:
                return _with_comment(decap_gre(payload))
            words = layout.words.unpack_from(payload)
            key = (head, layout.fixed(words))
        entry = self.known.get(key, False)
        if entry is False:
            entry = self._learn(key, payload)
        if entry is None:
            return None
        inner, meta, comment = entry
        if layout is not None and layout.varying:
            comment = layout.suffix % (comment, *layout.varying(words))
        return payload[inner:], meta, comment

    def _learn(self, key, payload):
        found = (decap_vxlan if self.vxlan else decap_gre)(payload)
        entry = None
        if found is not None:
            meta = found[1]._replace(sequence=None, timestamp=None)
            entry = (len(payload) - len(found[0]), meta, meta.comment())
        if len(self.known) >= 4096:  # many streams (or junk): stay bounded
            self.known.clear()
        self.known[key] = entry
        return entry


_WORD = struct.Struct("!I")


class _Layout(NamedTuple):
    length: int  # bytes of GRE (+ ERSPAN) header
    words: struct.Struct  # the header as 32-bit words
    fixed: object  # words -> the words that are the same for every packet of a stream
    varying: object  # words -> (timestamp, sequence) / (sequence,) / None
    suffix: str  # comment % (fixed part, *varying)
    fixed_words: tuple  # the indexes fixed() reads, and varying() (tunnelblock.py reads the ring with them)
    varying_words: tuple


def _gre_layout(head: int):
    """Which 32-bit words of a GRE header with these flags and protocol change per packet; None: not cached."""
    flags, proto = head >> 16, head & 0xFFFF
    if flags & 0x0007 or proto not in (PROTO_TEB, PROTO_ERSPAN, PROTO_ERSPAN3):
        return None
    count, fixed, sequence, timestamp = 1, [], None, None
    if flags & GRE_C:
        count += 1  # the checksum: not part of the comment
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
        if flags & GRE_K:
            return None  # the comment has the key after the timestamp
        fixed += [count, count + 2]
        timestamp = count + 1
        count += 3
    varying = [i for i in (timestamp, sequence) if i is not None]
    suffix = "%s" + (", timestamp %d" if timestamp is not None else "") + (", sequence %d" if sequence is not None else "")
    return _Layout(
        4 * count,
        struct.Struct(f"!{count}I"),
        _getter(fixed) or (lambda words: ()),
        _getter(varying),
        suffix,
        tuple(fixed),
        tuple(varying),
    )


def _getter(indexes: list[int]):
    """words -> a tuple of the words at indexes (itemgetter gives a bare item for one index)."""
    if len(indexes) == 1:
        (index,) = indexes
        return lambda words: (words[index],)
    return operator.itemgetter(*indexes) if indexes else None


def _with_comment(found):
    if found is None:
        return None
    frame, meta = found
    return frame, meta._replace(sequence=None, timestamp=None), meta.comment()
