"""One ring block of tunnel packets -> the pcapng blocks of their inner frames, in one buffer.

The hot loop of `vtap capture --listen` (terminate.py), as little Python per
packet as the job allows:

    reader = BlockReader(listen)
    blocks, kept, ignored, frames = reader.read(ring.map, offset, limit)
    # blocks: the EPBs of the kept inner frames (and the IDBs of streams seen for the first time), for one write;
    # frames: the inner frames themselves (with keep_frames=True, for --to port:IFNAME)

What the tunnel says of a frame goes where pcapng has a binary field for it,
so that most of it costs nothing per packet:
  - what is the same for every packet of a stream (ERSPAN type and session
    id, type III hardware id, GRE key, VNI): one Interface Description Block
    per stream description (if_name the listen URL, if_description e.g.
    "erspan, type III, session id 5, hardware id 17"); each frame names its
    interface;
  - the ERSPAN type III direction: epb_flags (ingress = inbound, egress = outbound);
  - the GRE sequence number: epb_packetid;
  - the ERSPAN type III timestamp (no binary field for it, and tshark shows
    no custom option): a packet comment "timestamp N", made anew only when
    it changes (Linux counts it in 100 us: packets in a row share it).

The packets of a tunnel stream repeat their headers. The first packet of a
stream is decapsulated by the general path (decap.py, after reassembly.py
for fragments) and what it learnt is kept per stream: where the inner frame
starts, whether the stream is selected (key, session id, VNI), its interface
and its fixed options (epb_flags). A stream is found by one
struct.unpack_from of its fixed fields, read from the IP header on (IP
version and header length, fragment field, protocol or next header; under
an IPsec Authentication Header, its next header, length and SPI; GRE flags
and protocol, key, ERSPAN words or the VXLAN header): the tuple is the key. A
packet whose key is not known (a new stream, IP options, a fragment,
IPv6 extension headers, another layout) takes the general path.
"""

from __future__ import annotations

import struct

from vtap_drivers.linux.decap import decap_gre, decap_vxlan, gre_layout
from vtap_drivers.linux.pcapng import EPB_PACKETID, EPB_TYPE, OPT_COMMENT, _packet_options, enhanced_packet, interface_description
from vtap_drivers.linux.reassembly import IPPROTO_AH, IPPROTO_FRAGMENT, Reassembly, upper_layer4, upper_layer6

IPPROTO_GRE, IPPROTO_UDP = 47, 17
IPV4_HEADER, IPV6_HEADER, UDP_HEADER = 20, 40, 8
ETHERNET_HEADER = 14
SHORTEST = IPV6_HEADER + UDP_HEADER + 24  # bytes: a shorter packet takes the general path (a key's reads stay inside it)
MAX_STREAMS = 4096  # per layout: many streams (or junk) stay bounded
MAX_LAYOUTS = 4096  # GRE headers and AH lengths seen (junk too): bounded as well
MAX_SHAPES = 4096  # per stream: frame sizes (and comment lengths)
MAX_INTERFACES = 4096  # stream descriptions remembered; past that, a description seen again gets a new IDB

BLOCK_HEADER = struct.Struct("II")  # num_pkts, offset_to_first_pkt, at 12 in a TPACKET_V3 block
FRAME_HEADER = struct.Struct("IIIII4xH")  # tpacket3_hdr: next, sec, nsec, snaplen, len, (status), mac
_WORD = struct.Struct("!I")
_OPTION_HEAD = struct.Struct("<HH")
PACKET_ID_HEAD = _OPTION_HEAD.pack(EPB_PACKETID, 8)

# What changes per packet of a stream (besides the GRE checksum): a bit each.
SEQUENCE, TIMESTAMP = 1, 2

# What the general path says of a packet that gives no frame: counted as ignored, or not counted at all
# (a fragment while more are to come; joined, a packet that is not the tunnel's).
IGNORED, SKIPPED = "ignored", "skipped"


class _Layout:
    """How to read one kind of stream (IP version; an Authentication Header of ah bytes, or none; GRE flags and
    protocol, or VXLAN) from the IP header on: key and varying are struct formats of what follows the IP header
    and AH ("x" for what they skip)."""

    def __init__(self, ipv6: bool, key: str, varying: str = "", changes: int = 0, ah: int = 0):
        ip = "!6xB33x" if ipv6 else "!B5xHxB10x"  # next header | version + header length, fragment field, protocol
        under = f"II{ah - 8}x" if ah else ""  # AH: next header, length, SPI; not its sequence number and ICV
        key = struct.Struct(ip + under + key)
        self.key = key.unpack_from
        self.least = max(SHORTEST, key.size)  # a shorter packet takes the general path (the key's reads stay inside it)
        self.varying = struct.Struct(f"!{(IPV6_HEADER if ipv6 else IPV4_HEADER) + ah}x" + varying).unpack_from if varying else None
        self.ah = ah
        self.changes = changes  # SEQUENCE | TIMESTAMP: what varying reads
        self.streams = {}  # key -> what _entry() made (NOT_SELECTED: another key, session or VNI)

    @classmethod
    def gre(cls, ipv6: bool, head: int, ah: int = 0):
        """For GRE packets of these flags and protocol, or None."""
        gre = gre_layout(head)
        if gre is None:
            return None
        words = range(gre.length // 4)
        key = "".join("I" if i == 0 or i in gre.fixed_words else "4x" for i in words)
        changing = [i for i in (gre.sequence_word, gre.timestamp_word) if i is not None]  # the sequence comes first
        varying = "".join("I" if i in changing else "4x" for i in range(changing[-1] + 1)) if changing else ""
        return cls(ipv6, key, varying, (gre.sequence_word is not None) * SEQUENCE | (gre.timestamp_word is not None) * TIMESTAMP, ah)


def _entry(inner: int, interface: int, flags: int | None, layout: _Layout):
    """(inner frame offset, shortest packet with a frame, interface, fixed options, varying reader, what it reads, EPB shapes).

    fixed options: epb_flags (if any) and the end of options, after what changes per packet (if anything);
    no options at all, not even their end, when there are none.
    """
    options = _packet_options(None, flags) if flags is not None or layout.changes else b""
    return (inner, inner + ETHERNET_HEADER, interface, options, layout.varying, layout.changes, {})


NOT_SELECTED = (0, 1 << 32, None, None, None, None, None)  # every packet is shorter: ignored


def _shape(shapes: dict, size: int, comment: int, packet_id: bool, options: int):
    """(pack, total length) of an EPB around a size-byte frame: a comment of that many bytes (if any), an
    epb_packetid (if packet_id), then options bytes. One struct for the whole block, remembered in shapes
    (an entry's) by size and comment length."""
    padding = -size & 3
    note = f"HH{comment}s{-comment & 3}x" if comment else ""
    layout = f"<7I{size}s{padding}x{note}" + ("4sQ" if packet_id else "") + f"{options}sI"
    total = 32 + size + padding + (4 + comment + (-comment & 3) if comment else 0) + 12 * packet_id + options
    if len(shapes) >= MAX_SHAPES:
        shapes.clear()
    shape = shapes[comment << 20 | size] = (struct.Struct(layout).pack, total)
    return shape


def timestamp_comment(timestamp: int) -> str:
    """The packet comment of an ERSPAN type III frame: the sender's timestamp, in its own granularity."""
    return f"timestamp {timestamp}"


class BlockReader:
    """For a writer without an interface of its own (PcapngWriter(interface=False)): it writes one per stream."""

    def __init__(self, listen, keep_frames: bool = False):
        self.vxlan = listen.scheme == "vxlan"
        self.ipv6 = ":" in listen.address
        self.port = listen.port
        self.proto = IPPROTO_UDP if self.vxlan else IPPROTO_GRE
        self.udp = UDP_HEADER if self.vxlan else 0
        self.header = IPV6_HEADER if self.ipv6 else IPV4_HEADER
        self.listen = listen
        self.keep_frames = keep_frames
        self.decap = decap_vxlan if self.vxlan else decap_gre
        self.joiner = Reassembly()
        self.layouts = {}  # (AH length or 0, GRE flags + protocol or 0 for VXLAN) -> _Layout, or None: not cached
        self.current = _Layout(self.ipv6, "I")  # the layout of the last stream seen: knows none yet
        self.interfaces = {}  # stream description -> interface id
        self.next_interface = 0
        self.new_interfaces = []  # their IDBs, to go before the first frame that names them
        self.last_note = None, b"", 0

    def read(self, ring, offset: int, limit: int | None = None):
        """The pcapng blocks of the inner frames of the block at offset (at most limit of them), as one bytes."""
        count, position = BLOCK_HEADER.unpack_from(ring, offset + 12)
        position += offset
        parts = []
        frames = [] if self.keep_frames else None
        kept = ignored = 0
        frame_header = FRAME_HEADER.unpack_from
        layout = self.current
        key, streams, least = layout.key, layout.streams.get, layout.least
        stamp, note, n = self.last_note  # ERSPAN timestamps repeat (Linux counts in 100 us): the last one's comment
        append = parts.append
        for _ in range(count):
            following, sec, nsec, captured, length, mac = frame_header(ring, position)
            start = position + mac
            position += following
            if captured != length:
                ignored += 1  # cut short: not a frame we can pass on unchanged
                continue
            entry = streams(key(ring, start)) if captured >= least else None
            if entry is None:
                entry = self._find(ring, start, captured)
                if entry is None:
                    found = self._general(ring, start, captured)
                    if found is IGNORED:
                        ignored += 1
                    elif found is not SKIPPED:
                        frame, interface, meta = found
                        parts += self.new_interfaces
                        self.new_interfaces.clear()
                        comment = None if meta.timestamp is None else timestamp_comment(meta.timestamp)
                        parts.append(enhanced_packet(frame, sec * 1_000_000_000 + nsec, interface_id=interface, comment=comment, flags=EPB_DIRECTION.get(meta.direction), packet_id=meta.sequence))
                        if frames is not None:
                            frames.append(frame)
                        kept += 1
                        if kept == limit:
                            break
                    continue
                layout = self.current
                key, streams, least = layout.key, layout.streams.get, layout.least
                parts += self.new_interfaces  # the IDB of a stream just learnt
                self.new_interfaces.clear()
            inner, shortest, interface, options, varying, changes, shapes = entry
            if captured < shortest:
                ignored += 1  # another key, session or VNI; or no room for a frame
                continue
            size = captured - inner
            timestamp = sec * 1_000_000_000 + nsec
            frame = ring[start + inner : start + captured]
            if not changes:
                pack, total = shapes.get(size) or _shape(shapes, size, 0, False, len(options))
                append(pack(EPB_TYPE, total, interface, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size, frame, options, total))
            elif changes == SEQUENCE:
                pack, total = shapes.get(size) or _shape(shapes, size, 0, True, len(options))
                append(pack(EPB_TYPE, total, interface, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size, frame, PACKET_ID_HEAD, varying(ring, start)[0], options, total))
            else:
                words = varying(ring, start)
                if words[-1] != stamp:
                    stamp = words[-1]
                    note = b"timestamp %d" % stamp  # timestamp_comment(), inline: it may change every packet
                    n = len(note)
                if changes & SEQUENCE:
                    pack, total = shapes.get(n << 20 | size) or _shape(shapes, size, n, True, len(options))
                    append(pack(EPB_TYPE, total, interface, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size, frame, OPT_COMMENT, n, note, PACKET_ID_HEAD, words[0], options, total))
                else:
                    pack, total = shapes.get(n << 20 | size) or _shape(shapes, size, n, False, len(options))
                    append(pack(EPB_TYPE, total, interface, timestamp >> 32, timestamp & 0xFFFFFFFF, size, size, frame, OPT_COMMENT, n, note, options, total))
            if frames is not None:
                frames.append(frame)
            kept += 1
            if kept == limit:
                break
        self.last_note = stamp, note, n
        return b"".join(parts), kept, ignored, frames

    def _interface(self, meta) -> int:
        """The interface id of a stream's frames: one IDB per stream description, made the first time it is seen."""
        description = meta.description()
        interface = self.interfaces.get(description)
        if interface is None:
            if len(self.interfaces) >= MAX_INTERFACES:
                self.interfaces.clear()
            interface = self.interfaces[description] = self.next_interface
            self.next_interface += 1
            self.new_interfaces.append(interface_description(if_name=self.listen.text, if_description=description))
        return interface

    def _find(self, ring, start: int, captured: int):
        """The stream of a packet the current layout does not know: another layout's, or learnt now; None: the general path's."""
        if captured < SHORTEST:
            return None
        if self.ipv6:
            protocol = ring[start + 6]
        elif ring[start] != 0x45 or ring[start + 6] & 0x3F or ring[start + 7]:
            return None  # IP options, or a fragment
        else:
            protocol = ring[start + 9]
        at, ah = start + self.header, 0
        if protocol == IPPROTO_AH:
            ah = 4 * (ring[at + 1] + 2)
            protocol = ring[at]
            if captured < SHORTEST + ah:
                return None  # too short to read past it here
        if protocol != self.proto:
            return None  # an extension header (a fragment, hop-by-hop options, ...), ESP: the general path
        head = 0 if self.vxlan else _WORD.unpack_from(ring, at + ah)[0]
        layout = self.layouts.get((ah, head), False)
        if layout is False:
            if len(self.layouts) >= MAX_LAYOUTS:
                self.layouts.clear()
            layout = self.layouts[ah, head] = _Layout(self.ipv6, "8xII", ah=ah) if self.vxlan else _Layout.gre(self.ipv6, head, ah)  # VXLAN: the UDP header, the VXLAN header
        if layout is None or captured < layout.least:
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
        tunnel = self.header + layout.ah + self.udp
        payload = bytes(ring[start + tunnel : start + captured])
        found = self.decap(payload)
        if found is None:
            return None
        frame, meta = found
        if not self._selected(meta):
            return NOT_SELECTED
        if len(frame) < ETHERNET_HEADER:
            return None  # no frame: the general path ignores it (and learns no interface)
        return _entry(tunnel + len(payload) - len(frame), self._interface(meta), EPB_DIRECTION.get(meta.direction), layout)

    def _general(self, ring, start: int, captured: int):
        """Any packet, as the reader always did: (inner frame, interface, Meta), IGNORED or SKIPPED (a fragment)."""
        packet = bytes(ring[start : start + captured])
        if self.ipv6:
            next_header, header = upper_layer6(packet)  # past hop-by-hop, routing, destination options, AH
            if next_header == IPPROTO_FRAGMENT:
                packet = self.joiner.add6(packet, header)
                if packet is None:
                    return SKIPPED  # more to come
                next_header, header = upper_layer6(packet)
                if next_header != self.proto or (self.udp and int.from_bytes(packet[header + 2 : header + 4], "big") != self.port):
                    return SKIPPED  # joined, it is not ours: not a tunnel packet at all
            elif next_header != self.proto:
                return IGNORED
        else:
            fragment = packet[6] & 0x3F or packet[7]  # more fragments, or an offset
            if fragment:
                packet = self.joiner.add(packet)
                if packet is None:
                    return SKIPPED
            protocol, header = upper_layer4(packet)  # past an Authentication Header
            if protocol != self.proto or (self.udp and int.from_bytes(packet[header + 2 : header + 4], "big") != self.port):
                return SKIPPED if fragment else IGNORED  # joined, it is not ours: not a tunnel packet at all
        found = self.decap(packet[header + self.udp :])
        if found is None or len(found[0]) < ETHERNET_HEADER or not self._selected(found[1]):
            return IGNORED
        frame, meta = found
        return frame, self._interface(meta), meta

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
