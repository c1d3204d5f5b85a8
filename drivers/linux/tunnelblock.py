"""One ring block of tunnel packets -> the pcapng Enhanced Packet Blocks of their inner frames, in one buffer.

The hot loop of `vtap capture --listen` (terminate.py), as little Python per
packet as the job allows:

    reader = BlockReader(listen)
    blocks, kept, ignored, frames = reader.read(ring.map, offset, limit)
    # blocks: the EPBs (each as PcapngWriter.write makes it) of the kept inner frames, for one write;
    # frames: the inner frames themselves (with keep_frames=True, for --to port:IFNAME)

The packets of a tunnel stream repeat their headers. The first packet of a
stream is decapsulated by the general path (decap.py's StreamDecap, after
reassembly.py for fragments) and what it learnt is kept per stream:
where the inner frame starts, whether the stream is selected (key, session id,
VNI), and the pcapng options (packet comment + epb_flags) as bytes, or, when
the GRE sequence number or ERSPAN timestamp change per packet, the comment's
text with room for them. A stream is found by one struct.unpack_from of
its fixed fields, read from the IP header on (IP version and header length,
fragment field or next header, GRE flags and protocol, key, ERSPAN words or
the VXLAN header): the tuple is the key. A packet whose key is not known (a
new stream, IP options, a fragment, another layout) takes the general path.
"""

from __future__ import annotations

import struct

from vtap_drivers.linux.decap import StreamDecap, _gre_layout
from vtap_drivers.linux.pcapng import EPB_TYPE, OPT_COMMENT, _packet_options, enhanced_packet
from vtap_drivers.linux.reassembly import IPPROTO_FRAGMENT, Reassembly

IPPROTO_GRE, IPPROTO_UDP = 47, 17
IPV4_HEADER, IPV6_HEADER, UDP_HEADER = 20, 40, 8
ETHERNET_HEADER = 14
SHORTEST = IPV6_HEADER + UDP_HEADER + 24  # bytes: a shorter packet takes the general path (a key's reads stay inside it)
MAX_STREAMS = 4096  # per layout: many streams (or junk) stay bounded
MAX_SHAPES = 4096  # per stream: frame sizes (and comment lengths)

BLOCK_HEADER = struct.Struct("II")  # num_pkts, offset_to_first_pkt, at 12 in a TPACKET_V3 block
FRAME_HEADER = struct.Struct("IIIII4xH")  # tpacket3_hdr: next, sec, nsec, snaplen, len, (status), mac
_WORD = struct.Struct("!I")


# What the general path says of a packet that gives no frame: counted as ignored, or not counted at all
# (a fragment while more are to come; joined, a packet that is not the tunnel's).
IGNORED, SKIPPED = "ignored", "skipped"


# decap.py's comment suffixes for what changes per packet -> how read() writes them (f-strings: quicker than %).
SUFFIXES = {"%s": None, "%s, sequence %d": "sequence", "%s, timestamp %d": "timestamp", "%s, timestamp %d, sequence %d": "both"}


class _Layout:
    """How to read one kind of stream (IP version; GRE flags and protocol, or VXLAN) from the IP header on:
    key and varying are struct formats of what follows the IP header ("x" for what they skip)."""

    def __init__(self, ipv6: bool, key: str, varying: str = "", suffix: str = "%s"):
        ip = "!6xB33x" if ipv6 else "!B5xH12x"  # next header | version + header length, fragment field
        self.key = struct.Struct(ip + key).unpack_from
        self.varying = struct.Struct(f"!{IPV6_HEADER if ipv6 else IPV4_HEADER}x" + varying).unpack_from if varying else None
        self.suffix = SUFFIXES[suffix]
        self.streams = {}  # key -> what _entry() made (NOT_SELECTED: another key, session or VNI)

    @classmethod
    def gre(cls, ipv6: bool, head: int):
        """For GRE packets of these flags and protocol (decap.py says which words change per packet), or None."""
        gre = _gre_layout(head)
        if gre is None or gre.suffix not in SUFFIXES:
            return None
        words = range(gre.length // 4)
        key = "".join("I" if i == 0 or i in gre.fixed_words else "4x" for i in words)
        varying = "".join("I" if i in gre.varying_words else "4x" for i in words) if gre.varying_words else ""
        return cls(ipv6, key, varying, gre.suffix)  # varying: in the packet's order (sequence, then timestamp)


def _entry(inner: int, comment: str, flags: int | None, layout: _Layout):
    """(inner frame offset, shortest packet with a frame, options, comment, varying reader, suffix, EPB shapes).

    options: the whole options as bytes when they are the same for every packet (comment None);
    else what follows the comment (epb_flags, the end), the comment read per packet (varying).
    """
    if layout.varying is None:
        return (inner, inner + ETHERNET_HEADER, _packet_options(comment, flags), None, None, None, {})
    return (inner, inner + ETHERNET_HEADER, _packet_options(None, flags), comment, layout.varying, layout.suffix, {})


NOT_SELECTED = (0, 1 << 32, None, None, None, None, None)  # every packet is shorter: ignored


def _shape(shapes: dict, size: int, comment: int, options: int):
    """(pack, total length) of an EPB around a size-byte frame with these options (a comment of that many
    bytes first, if any): one struct for the whole block, remembered in shapes (an entry's) by size and comment."""
    padding = -size & 3
    if comment:
        layout, total = f"<7I{size}s{padding}xHH{comment}s{-comment & 3}x{options}sI", 32 + size + padding + 4 + comment + (-comment & 3) + options
    else:
        layout, total = f"<7I{size}s{padding}x{options}sI", 32 + size + padding + options
    if len(shapes) >= MAX_SHAPES:
        shapes.clear()
    shape = shapes[comment << 20 | size] = (struct.Struct(layout).pack, total)
    return shape


class BlockReader:
    def __init__(self, listen, keep_frames: bool = False):
        self.vxlan = listen.scheme == "vxlan"
        self.ipv6 = ":" in listen.address
        self.port = listen.port
        self.proto = IPPROTO_UDP if self.vxlan else IPPROTO_GRE
        self.udp = UDP_HEADER if self.vxlan else 0
        self.header = IPV6_HEADER if self.ipv6 else IPV4_HEADER
        self.listen = listen
        self.keep_frames = keep_frames
        self.decap = StreamDecap(vxlan=self.vxlan)
        self.joiner = Reassembly()
        self.layouts = {}  # GRE flags + protocol -> _Layout, or None: not cached
        self.vxlan_layout = _Layout(self.ipv6, "8xII") if self.vxlan else None  # the UDP header, the VXLAN header
        self.current = _Layout(self.ipv6, "I")  # the layout of the last stream seen: knows none yet

    def read(self, ring, offset: int, limit: int | None = None):
        """The EPBs of the inner frames of the block at offset (at most limit of them), as one bytes."""
        count, position = BLOCK_HEADER.unpack_from(ring, offset + 12)
        position += offset
        parts = []
        frames = [] if self.keep_frames else None
        kept = ignored = 0
        frame_header = FRAME_HEADER.unpack_from
        layout = self.current
        key, streams = layout.key, layout.streams.get
        append = parts.append
        for _ in range(count):
            following, sec, nsec, captured, length, mac = frame_header(ring, position)
            start = position + mac
            position += following
            if captured != length:
                ignored += 1  # cut short: not a frame we can pass on unchanged
                continue
            entry = streams(key(ring, start)) if captured >= SHORTEST else None
            if entry is None:
                entry = self._find(ring, start, captured)
                if entry is None:
                    found = self._general(ring, start, captured)
                    if found is IGNORED:
                        ignored += 1
                    elif found is not SKIPPED:
                        frame, comment, flags = found
                        parts.append(enhanced_packet(frame, sec * 1_000_000_000 + nsec, comment=comment, flags=flags))
                        if frames is not None:
                            frames.append(frame)
                        kept += 1
                        if kept == limit:
                            break
                    continue
                layout = self.current
                key, streams = layout.key, layout.streams.get
            inner, shortest, options, comment, varying, suffix, shapes = entry
            if captured < shortest:
                ignored += 1  # another key, session or VNI; or no room for a frame
                continue
            size = captured - inner
            timestamp = sec * 1_000_000_000 + nsec
            frame = ring[start + inner : start + captured]
            if varying is None:
                pack, total = shapes.get(size) or _shape(shapes, size, 0, len(options))
                append(pack(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size, frame, options, total))
            else:
                if suffix == "both":
                    sequence, stamp = varying(ring, start)
                    text = f"{comment}, timestamp {stamp}, sequence {sequence}".encode()
                elif suffix == "sequence":
                    text = f"{comment}, sequence {varying(ring, start)[0]}".encode()
                else:
                    text = f"{comment}, timestamp {varying(ring, start)[0]}".encode()
                n = len(text)
                pack, total = shapes.get(n << 20 | size) or _shape(shapes, size, n, len(options))
                append(pack(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size, frame, OPT_COMMENT, n, text, options, total))
            if frames is not None:
                frames.append(frame)
            kept += 1
            if kept == limit:
                break
        return b"".join(parts), kept, ignored, frames

    def _find(self, ring, start: int, captured: int):
        """The stream of a packet the current layout does not know: another layout's, or learnt now; None: the general path's."""
        if captured < SHORTEST:
            return None
        if self.ipv6:
            if ring[start + 6] != self.proto:
                return None  # an extension header (a fragment): the general path
        elif ring[start] != 0x45 or ring[start + 6] & 0x3F or ring[start + 7]:
            return None  # IP options, or a fragment
        if self.vxlan:
            layout = self.vxlan_layout
        else:
            head = _WORD.unpack_from(ring, start + self.header)[0]
            layout = self.layouts.get(head, False)
            if layout is False:
                layout = self.layouts[head] = _Layout.gre(self.ipv6, head)
            if layout is None:
                return None
        key = layout.key(ring, start)
        entry = layout.streams.get(key)
        if entry is None:
            entry = self._learn(layout, ring, start, captured)
            if entry is None:
                return None
            if len(layout.streams) >= MAX_STREAMS:
                layout.streams.clear()
            layout.streams[key] = entry
        self.current = layout
        return entry

    def _learn(self, layout: _Layout, ring, start: int, captured: int):
        tunnel = self.header + self.udp
        payload = bytes(ring[start + tunnel : start + captured])
        found = self.decap(payload)
        if found is None:
            return None
        frame, meta, _comment = found  # meta without the sequence and timestamp; _comment with this packet's
        if not self._selected(meta):
            return NOT_SELECTED
        flags = EPB_DIRECTION.get(meta.direction)
        return _entry(tunnel + len(payload) - len(frame), meta.comment(), flags, layout)

    def _general(self, ring, start: int, captured: int):
        """Any packet, as the reader always did: (inner frame, comment, epb_flags), IGNORED or SKIPPED (a fragment)."""
        packet = bytes(ring[start : start + captured])
        if self.ipv6:
            if packet[6] == IPPROTO_FRAGMENT:
                packet = self.joiner.add6(packet)
                if packet is None:
                    return SKIPPED  # more to come
                if packet[6] != self.proto or (self.udp and int.from_bytes(packet[42:44], "big") != self.port):
                    return SKIPPED  # joined, it is not ours: not a tunnel packet at all
            header = IPV6_HEADER
        else:
            if packet[6] & 0x3F or packet[7]:  # an IPv4 fragment: more fragments, or an offset
                packet = self.joiner.add(packet)
                if packet is None:
                    return SKIPPED
                if self.udp and int.from_bytes(packet[22:24], "big") != self.port:
                    return SKIPPED  # joined, it is UDP to another port: not ours
            header = (packet[0] & 0x0F) * 4
        found = self.decap(packet[header + self.udp :])
        if found is None or len(found[0]) < ETHERNET_HEADER or not self._selected(found[1]):
            return IGNORED
        frame, meta, comment = found
        return frame, comment, EPB_DIRECTION.get(meta.direction)

    def _selected(self, meta) -> bool:
        only, scheme = self.listen.only, self.listen.scheme
        if only is None:
            return True
        if scheme == "gre":
            return meta.tunnel == "gre" and meta.key == only
        if scheme == "erspan":
            return meta.tunnel == "erspan" and meta.session_id == only
        return meta.vni == only


# pcapng epb_flags: bits 0-1 direction, 01 inbound, 10 outbound (only ERSPAN type III says: ingress, egress).
EPB_DIRECTION = {"ingress": 1, "egress": 2}
