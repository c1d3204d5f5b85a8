"""sinkblock.py on ring blocks laid out as the kernel fills a pcap sink's ring (SOCK_RAW, TPACKET_V3): the pcapng
is byte for byte what PcapngWriter.write() makes of the same frames, and tshark reads back every frame as it was
on the wire (802.1Q tags the kernel kept in metadata put back, cut to snaplen, original lengths, nanoseconds)."""

import struct

from test_pcapng import pytestmark, some_frames, tshark_frames  # noqa: F401 (skipped without tshark, as test_pcapng)

from vtap_drivers.linux.pcapng import PcapngWriter
from vtap_drivers.linux.ring import TP_STATUS_USER, TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID
from vtap_drivers.linux.sinkblock import SinkBlocks

FRAME_HEADER = struct.Struct("IIIIIIHHIIH")  # tpacket3_hdr up to tp_vlan_tpid
MAC = 82  # tpacket3_hdr + sockaddr_ll, aligned to 16 for the network header: where a SOCK_RAW frame starts
FIRST = 48
T0 = 1_700_000_000_123_456_789


def ring_block(entries, snaplen=None):
    """One TPACKET_V3 block handed over to userspace. entries: (frame as on the wire, (tpid, tci) or None).
    As the kernel does: a tag in metadata is taken out of the frame, at most snaplen bytes are copied."""
    block, position = bytearray(1 << 20), FIRST
    for number, (wire, tag) in enumerate(entries):
        status, tci, tpid = TP_STATUS_USER, 0, 0
        frame = wire
        if tag is not None:
            tpid, tci = tag
            frame = wire[:12] + wire[16:]
            status |= TP_STATUS_VLAN_VALID | (TP_STATUS_VLAN_TPID_VALID if tpid else 0)
        copied = frame[:snaplen] if snaplen else frame
        step = (MAC + len(copied) + 15) & ~15
        seconds, nanoseconds = divmod(T0 + number * 1001, 1_000_000_000)
        FRAME_HEADER.pack_into(block, position, step, seconds, nanoseconds, len(copied), len(frame), status, MAC, MAC + 14, 0, tci, tpid)
        block[position + MAC : position + MAC + len(copied)] = copied
        position += step
    struct.pack_into("III", block, 8, TP_STATUS_USER, len(entries), FIRST)
    return block


def tagged(frame, tpid, tci):
    return frame[:12] + struct.pack("!HH", tpid or 0x8100, tci) + frame[12:]


def entries():
    frames = some_frames(40)
    out = [(f, None) for f in frames[:30]]
    out += [(tagged(f, 0x88A8, 7), (0x88A8, 7)) for f in frames[30:35] if len(f) >= 14]
    out += [(tagged(f, 0, 42), (0, 42)) for f in frames[35:] if len(f) >= 14]  # no tpid in metadata: 802.1Q
    return out


def written_by_write(path, wire_frames, snaplen=None, **rotation):
    with PcapngWriter.create(str(path), snaplen=snaplen, **rotation) as writer:
        for number, frame in enumerate(wire_frames):
            writer.write(frame, T0 + number * 1001, len(frame))


def written_by_blocks(path, block, snaplen=None, **rotation):
    with PcapngWriter.create(str(path), snaplen=snaplen, **rotation) as writer:
        writer.write_epbs(*SinkBlocks(snaplen).read(block, 0))
        return writer.frames


def test_a_block_gives_the_bytes_write_gives_and_tshark_reads_the_frames_as_on_the_wire(tmp_path):
    wire = [frame for frame, _tag in entries()]
    written_by_write(tmp_path / "write.pcapng", wire)
    assert written_by_blocks(tmp_path / "blocks.pcapng", ring_block(entries())) == len(wire)
    assert (tmp_path / "blocks.pcapng").read_bytes() == (tmp_path / "write.pcapng").read_bytes()
    read = tshark_frames(tmp_path / "blocks.pcapng")
    assert [(raw, captured, original) for raw, captured, original, _time in read] == [(f, len(f), len(f)) for f in wire]
    assert read[1][3] == "1700000000.123457790"  # T0 + 1001 ns


def test_snaplen_cuts_tagged_frames_too_and_keeps_their_length_on_the_wire(tmp_path):
    wire = [frame for frame, _tag in entries()]
    written_by_write(tmp_path / "write.pcapng", wire, snaplen=60)
    written_by_blocks(tmp_path / "blocks.pcapng", ring_block(entries(), snaplen=60), snaplen=60)
    assert (tmp_path / "blocks.pcapng").read_bytes() == (tmp_path / "write.pcapng").read_bytes()
    read = tshark_frames(tmp_path / "blocks.pcapng")
    assert [(raw, original) for raw, _captured, original, _time in read] == [(f[:60], len(f)) for f in wire]


def test_a_block_larger_than_max_size_is_rotated_where_write_rotates(tmp_path):
    wire = [bytes([i]) * 3000 for i in range(40)]  # large frames: written from the ring, without a copy
    (tmp_path / "write").mkdir()
    (tmp_path / "blocks").mkdir()
    written_by_write(tmp_path / "write" / "r.pcapng", wire, max_size=10_000, max_files=3)
    written_by_blocks(tmp_path / "blocks" / "r.pcapng", ring_block([(f, None) for f in wire]), max_size=10_000, max_files=3)
    names = sorted(p.name for p in (tmp_path / "write").iterdir())
    assert names == ["r.pcapng", "r.pcapng.1", "r.pcapng.2"]
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == names
    for name in names:
        assert (tmp_path / "blocks" / name).read_bytes() == (tmp_path / "write" / name).read_bytes()
