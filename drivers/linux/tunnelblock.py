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

import operator
import struct

from vtap_drivers.linux.decap import StreamDecap, _gre_layout
from vtap_drivers.linux.pcapng import EPB_TYPE, OPT_COMMENT, _PADDING, _packet_options, enhanced_packet
from vtap_drivers.linux.reassembly import IPPROTO_FRAGMENT, Reassembly

IPPROTO_GRE, IPPROTO_UDP = 47, 17
IPV4_HEADER, IPV6_HEADER, UDP_HEADER = 20, 40, 8
ETHERNET_HEADER = 14
SHORTEST = IPV6_HEADER + UDP_HEADER + 24  # bytes: a shorter packet takes the general path (a key's reads stay inside it)
MAX_STREAMS = 4096  # per layout: many streams (or junk) stay bounded

BLOCK_HEADER = struct.Struct("II")  # num_pkts, offset_to_first_pkt, at 12 in a TPACKET_V3 block
FRAME_HEADER = struct.Struct("IIIIIIH")  # tpacket3_hdr: next, sec, nsec, snaplen, len, status, mac
EPB_HEAD = struct.Struct("<7I")  # type, total length, interface, timestamp high, low, captured, original
EPB_TAIL = struct.Struct("<I")
COMMENT_HEADS = [struct.Struct(f"<{padding}xHH") for padding in range(4)]  # the frame's padding + the comment option's head
_WORD = struct.Struct("!I")


# What the general path says of a packet that gives no frame: counted as ignored, or not counted at all
# (a fragment while more are to come; joined, a packet that is not the tunnel's).
IGNORED, SKIPPED = "ignored", "skipped"


class _Layout:
    """How to read one kind of stream (IP version; GRE flags and protocol, or VXLAN) from the IP header on."""

    def __init__(self, ipv6: bool, udp: int, words: int, fixed: tuple, varying: tuple = (), suffix: str = "%s"):
        ip = "!6xB33x" if ipv6 else "!B5xH12x"  # next header | version + header length, fragment field
        self.key = struct.Struct(ip + "".join("I" if i == 0 or i in fixed else "4x" for i in range(words)) if not udp else ip + "8xII").unpack_from
        ordered = sorted(varying)
        self.varying = struct.Struct(f"!{IPV6_HEADER if ipv6 else IPV4_HEADER}x" + "".join("I" if i in varying else "4x" for i in range(words))).unpack_from if varying else None
        # The comment names them in another order than the packet holds them (timestamp, then sequence).
        self.order = operator.itemgetter(*(ordered.index(i) for i in varying)) if list(varying) != ordered else None
        self.suffix = suffix  # decap's comment % (fixed part, *varying)
        self.streams = {}  # key -> what _entry() made (NOT_SELECTED: another key, session or VNI)


def _entry(inner: int, comment: str, flags: int | None, layout: _Layout):
    """(inner frame offset, options by padding or None, comment format, varying reader, order, after by padding, fixed length)."""
    if layout.varying is None:
        options = _packet_options(comment, flags)
        return (inner, [_PADDING[padding] + options for padding in range(4)], None, None, None, None, 32 + len(options))
    after = _packet_options(None, flags)  # epb_flags (if any) and the end of options
    text = comment.replace("%", "%%") + layout.suffix[2:]  # suffix: "%s, timestamp %d, sequence %d"
    return (inner, None, text, layout.varying, layout.order, [_PADDING[padding] + after for padding in range(4)], 32 + 4 + len(after))


NOT_SELECTED = (0, None, None, None, None, None, 0)


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
        self.vxlan_layout = _Layout(self.ipv6, UDP_HEADER, 2, (0, 1)) if self.vxlan else None
        self.current = _Layout(self.ipv6, 0, 1, ())  # the layout of the last stream seen: knows none yet

    def read(self, ring, offset: int, limit: int | None = None):
        """The EPBs of the inner frames of the block at offset (at most limit of them), as one bytearray."""
        count, position = BLOCK_HEADER.unpack_from(ring, offset + 12)
        position += offset
        out = bytearray()
        frames = [] if self.keep_frames else None
        kept = ignored = 0
        frame_header, head, tail = FRAME_HEADER.unpack_from, EPB_HEAD.pack, EPB_TAIL.pack
        layout = self.current
        key, streams = layout.key, layout.streams.get
        for _ in range(count):
            following, sec, nsec, captured, length, _status, mac = frame_header(ring, position)
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
                        out += enhanced_packet(frame, sec * 1_000_000_000 + nsec, comment=comment, flags=flags)
                        if frames is not None:
                            frames.append(frame)
                        kept += 1
                        if kept == limit:
                            break
                    continue
                layout = self.current
                key, streams = layout.key, layout.streams.get
            inner, options, text, varying, order, after, fixed_length = entry
            size = captured - inner
            if not inner or size < ETHERNET_HEADER:
                ignored += 1  # another key, session or VNI; or no room for a frame
                continue
            timestamp = sec * 1_000_000_000 + nsec
            padding = -size & 3
            frame = ring[start + inner : start + captured]
            if options is not None:
                total = fixed_length + size + padding
                out += head(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size)
                out += frame
                out += options[padding]
            else:
                comment = (text % (varying(ring, start) if order is None else order(varying(ring, start)))).encode()
                n = len(comment)
                total = fixed_length + size + padding + n + (-n & 3)
                out += head(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size)
                out += frame
                out += COMMENT_HEADS[padding].pack(OPT_COMMENT, n)
                out += comment
                out += after[-n & 3]
            out += tail(total)
            if frames is not None:
                frames.append(frame)
            kept += 1
            if kept == limit:
                break
        return out, kept, ignored, frames

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
                gre = _gre_layout(head)
                layout = self.layouts[head] = None if gre is None else _Layout(self.ipv6, 0, gre.length // 4, (0, *gre.fixed_words), gre.varying_words, gre.suffix)
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
