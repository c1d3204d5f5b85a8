"""IPv4 and IPv6 reassembly for tunnel packets the ring sees as fragments (RFC 791, RFC 8200: the receiver's part).

A tunnel sender without DF (a kernel vxlan device, by default) fragments an
outer packet that is larger than the path MTU; over IPv6 the sender always
does (routers never do), with a Fragment extension header. The ring in
terminate.py reads packets before the IP stack reassembles them, so the
fragments of one outer packet are joined here:

    joiner = Reassembly()
    whole = joiner.add(packet)    # an IPv4 fragment (a view is fine) -> the whole packet, or None for now
    whole = joiner.add6(packet, at)   # an IPv6 packet whose Fragment header is at `at` (40: after the fixed header)
    next_header, at = upper_layer6(packet)  # past hop-by-hop, routing, destination options and AH headers
    protocol, at = upper_layer4(packet)     # past an IPv4 Authentication Header

The whole IPv4 packet is the first fragment's header (without options) and
the joined payload; the whole IPv6 packet is the first fragment's fixed
header, its next header the Fragment header's, and the joined payload (the
extension headers before the Fragment header are left out; those after it,
in the fragmentable part, are the joined payload's first bytes: upper_layer6
walks them).
Overlapping or duplicate fragments spoil the packet (it is dropped, as the IP
stack would); at most MAX_PENDING packets (of both versions) are waited for,
the oldest is given up first; a packet is given up after TIMEOUT seconds.
"""

from __future__ import annotations

import struct
import time

MAX_PENDING = 1024
TIMEOUT = 30.0  # seconds, as the kernel's ipfrag_time
MORE_FRAGMENTS = 0x2000
OFFSET_MASK = 0x1FFF
IPV6_HEADER = 40
IPV6_FRAGMENT_HEADER = 8
IPPROTO_FRAGMENT = 44  # IPv6 Fragment extension header
IPPROTO_AH = 51  # Authentication Header (RFC 4302): (next header, length in 4 octets not counting the first 8, ...)
# Extension headers walked, each (next header, length in 8 octets not counting the first 8, ...) (RFC 8200 4):
# hop-by-hop options, routing, destination options.
EXTENSIONS = frozenset((0, 43, 60))
# Headers walked at most, the Fragment header counted: RFC 8200 4.1's order has six before the upper layer
# (hop-by-hop, destination options, routing, fragment, AH, destination options). The kernel filter in
# terminate.py walks as many; a packet with more is dropped, never read from a guessed place.
MAX_EXTENSIONS = 6


def upper_layer6(packet) -> tuple[int | None, int]:
    """(next header, its offset) past the extension and AH headers before a Fragment or upper-layer header;
    (None, 0) when they run past the packet or there are more than MAX_EXTENSIONS."""
    next_header, at = packet[6], IPV6_HEADER
    for _ in range(MAX_EXTENSIONS + 1):
        if next_header in EXTENSIONS:
            length = 8 * (packet[at + 1] + 1) if at + 8 <= len(packet) else 0
        elif next_header == IPPROTO_AH:
            length = 4 * (packet[at + 1] + 2) if at + 8 <= len(packet) else 0
        else:
            return next_header, at
        if not length:
            break
        next_header, at = packet[at], at + length
    return None, 0


def upper_layer4(packet) -> tuple[int | None, int]:
    """(protocol, its offset) of an IPv4 packet, past an Authentication Header if there is one;
    (None, 0) when that runs past the packet."""
    protocol, at = packet[9], (packet[0] & 0x0F) * 4
    if protocol != IPPROTO_AH:
        return protocol, at
    if at + 8 > len(packet):
        return None, 0
    return packet[at], at + 4 * (packet[at + 1] + 2)


class Reassembly:
    def __init__(self):
        self.pending = {}  # (source, destination, id, protocol) or (source + destination, id) -> [started, {offset: payload}, end or None, header]
        self.given_up = 0  # packets whose fragments did not all arrive

    def add(self, packet):
        header_length = (packet[0] & 0x0F) * 4
        total_length, ident, fragment = struct.unpack_from("!HHH", packet, 2)
        key = (bytes(packet[12:20]), ident, packet[9])
        offset = (fragment & OFFSET_MASK) * 8
        return self._add(key, offset, bytes(packet[header_length:total_length]), fragment & MORE_FRAGMENTS, packet[:20])

    def add6(self, packet, at: int = IPV6_HEADER):
        if len(packet) < at + IPV6_FRAGMENT_HEADER:
            return None  # no room for its Fragment header: nothing to join
        payload_length, = struct.unpack_from("!H", packet, 4)
        next_header, _reserved, fragment, ident = struct.unpack_from("!BBHI", packet, at)
        key = (bytes(packet[8:40]), ident)
        offset = fragment & 0xFFF8  # 13 bits of 8-byte units, as a byte count
        header = bytearray(packet[:IPV6_HEADER])
        header[6] = next_header  # what the joined payload is (only the first fragment's counts)
        return self._add(key, offset, bytes(packet[at + IPV6_FRAGMENT_HEADER : IPV6_HEADER + payload_length]), fragment & 1, header)

    def _add(self, key, offset, payload, more, header):
        entry = self.pending.get(key)
        if entry is None:
            now = time.monotonic()
            self._make_room(now)
            entry = self.pending[key] = [now, {}, None, None]
        if offset in entry[1] or (entry[2] is not None and offset + len(payload) > entry[2]):
            del self.pending[key]  # duplicate or overlapping: spoilt
            return None
        entry[1][offset] = payload
        if offset == 0:
            entry[3] = bytes(header)
        if not more:
            entry[2] = offset + len(payload)
        return self._joined(key, entry)

    def _joined(self, key, entry):
        if entry[2] is None or entry[3] is None:
            return None
        position, parts = 0, []
        for offset in sorted(entry[1]):
            if offset != position:
                return None if offset > position else self._spoil(key)
            parts.append(entry[1][offset])
            position += len(entry[1][offset])
        if position != entry[2]:
            return None
        del self.pending[key]
        payload = b"".join(parts)
        header = bytearray(entry[3])
        if header[0] >> 4 == 6:
            struct.pack_into("!H", header, 4, len(payload))
            return bytes(header) + payload
        header[0] = 0x45  # no options
        struct.pack_into("!H", header, 2, 20 + len(payload))
        struct.pack_into("!H", header, 6, 0)  # not a fragment (the checksum is left as it was: nobody checks it)
        return bytes(header) + payload

    def _spoil(self, key):
        del self.pending[key]
        return None

    def _make_room(self, now: float) -> None:
        for key in list(self.pending):
            started = self.pending[key][0]
            if len(self.pending) < MAX_PENDING and now - started < TIMEOUT:
                break
            del self.pending[key]
            self.given_up += 1
