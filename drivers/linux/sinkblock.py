"""One ring block of a pcap sink's frames -> their pcapng Enhanced Packet Blocks, for one write.

The hot loop of a pcap target's capture process (capture.py), with as little
Python per frame as the job allows: one struct.unpack_from of the frame's
ring header and one struct.pack of its whole EPB (one struct per frame size,
made once), then one write per block instead of three per frame. A large
frame (a TSO stream's ~64 KB) is not copied on the way: its EPB is a header,
a view into the ring and a tail, and the write (writev) copies it from the
ring into the file.

    epbs = SinkBlocks(snaplen)
    parts, frames = epbs.read(ring.map, offset)    # a block the kernel handed over (PacketRing.block_offsets)
    writer.write_epbs(parts, frames)               # parts: the EPBs, one after the other

The bytes are those PcapngWriter.write() gives for the same frames: a frame
whose 802.1Q tag the kernel moved into metadata gets it back (and is cut to
snaplen again: the tag adds 4 bytes to what the kernel copied).
"""

from __future__ import annotations

import struct

from vtap_drivers.linux.pcapng import _EPB_HEAD, _EPB_TAILS, EPB_TYPE, enhanced_packet
from vtap_drivers.linux.ring import TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID

BLOCK_HEADER = struct.Struct("II")  # num_pkts, offset_to_first_pkt, at 12 in a TPACKET_V3 block
FRAME_HEADER = struct.Struct("IIIIIIH")  # tpacket3_hdr: next, sec, nsec, snaplen, len, status, mac
VLAN = struct.Struct("IH")  # tp_vlan_tci, tp_vlan_tpid (tpacket_hdr_variant1), at 32
VLAN_OFFSET = 32
LARGE = 2048  # bytes: a frame this long is written from the ring (copying it twice costs more than three parts)


def _shape(shapes: dict, size: int):
    """(pack, total length) of an EPB around a size-byte frame, remembered in shapes (LARGE of them at most)."""
    padding = -size & 3
    shape = shapes[size] = (struct.Struct(f"<7I{size}s{padding}xI").pack, 32 + size + padding)
    return shape


def tagged_epb(mapping, start: int, captured: int, length: int, timestamp: int, tpid: int, tci: int, snaplen: int | None) -> bytes:
    """The EPB of a frame as it was on the wire: its 802.1Q tag, which the kernel kept in metadata,
    back after the two MAC addresses (and cut to snaplen again: the tag adds 4 bytes)."""
    frame = mapping[start : start + 12] + struct.pack("!HH", tpid, tci) + mapping[start + 12 : start + captured]
    return enhanced_packet(frame, timestamp, length + 4, snaplen)


def large_epb(view: memoryview, start: int, captured: int, length: int, timestamp: int) -> tuple:
    """The EPB of a large frame as three parts, the frame a view into the mapping: the write copies it once."""
    padding = -captured & 3
    total = 32 + captured + padding
    return _EPB_HEAD.pack(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, captured, length), view[start : start + captured], _EPB_TAILS[padding].pack(total)


class SinkBlocks:
    def __init__(self, snaplen: int | None = None):
        self.snaplen = snaplen
        self.shapes = {}

    def read(self, ring, offset: int) -> tuple[list, int]:
        """(the EPBs of every frame in the block at offset, as a list of bytes-like parts; how many frames).

        The parts may be views into the ring: write them before the block goes back to the kernel.
        """
        count, position = BLOCK_HEADER.unpack_from(ring, offset + 12)
        position += offset
        parts, small = [], []  # small: EPBs made whole, joined into one part before a large frame's
        append = small.append
        header = FRAME_HEADER.unpack_from
        shapes = self.shapes
        view = None
        for _ in range(count):
            following, sec, nsec, captured, length, status, mac = header(ring, position)
            start = position + mac
            timestamp = sec * 1_000_000_000 + nsec
            if status & TP_STATUS_VLAN_VALID:
                append(self._tagged(ring, position, start, captured, length, status, timestamp))
            elif captured < LARGE:
                pack, total = shapes.get(captured) or _shape(shapes, captured)
                append(pack(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, captured, length, ring[start : start + captured], total))
            else:
                if small:
                    parts.append(b"".join(small))
                    small.clear()
                view = view or memoryview(ring)
                parts += large_epb(view, start, captured, length, timestamp)
            position += following
        if small:
            parts.append(b"".join(small))
        return parts, count

    def _tagged(self, ring, position, start, captured, length, status, timestamp) -> bytes:
        """The frame as it was on the wire: the tag back after the two MAC addresses (as ring.py's frames)."""
        tci, tpid = VLAN.unpack_from(ring, position + VLAN_OFFSET)
        tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
        return tagged_epb(ring, start, captured, length, timestamp, tpid, tci, self.snaplen)
