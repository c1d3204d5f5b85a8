"""The pcapng writer, checked by two independent readers: tshark and scapy."""

import json
import random
import shutil
import subprocess

import pytest

from vtap_core.errors import ValidationError
from vtap_drivers.linux.pcapng import PcapngWriter

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (scripts/setup --test installs it)")


def tshark_frames(path):
    """[(raw bytes, captured length, original length, epoch text)] as tshark reads the file."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x"], check=True, capture_output=True, text=True).stdout
    frames = []
    for packet in json.loads(out):
        layers = packet["_source"]["layers"]
        frame = layers["frame"]
        frames.append((bytes.fromhex(layers["frame_raw"][0]), int(frame["frame.cap_len"]), int(frame["frame.len"]), frame["frame.time_epoch"]))
    return frames


def capinfos(path):
    return subprocess.run(["capinfos", str(path)], check=True, capture_output=True, text=True).stdout


def scapy_frames(path):
    from scapy.utils import rdpcap

    return [(bytes(p), p.wirelen, p.time) for p in rdpcap(str(path))]


def some_frames(count, seed=7):
    rng = random.Random(seed)
    # Odd lengths exercise the 32-bit padding; 9000 is a jumbo frame.
    lengths = [14, 15, 17, 60, 61, 64, 1514, 9000] + [rng.randint(14, 1600) for _ in range(count - 8)]
    return [rng.randbytes(n) for n in lengths]


def test_frames_read_back_byte_identical_with_nanosecond_timestamps(tmp_path):
    path = tmp_path / "round.pcapng"
    frames = some_frames(40)
    stamps = [1_700_000_000_000_000_000 + i * 1_000_000_007 + 123 for i in range(len(frames))]
    with PcapngWriter.create(str(path), if_name="vtapdum0") as writer:
        for frame, stamp in zip(frames, stamps):
            writer.write(frame, stamp)

    seen = tshark_frames(path)
    assert [raw for raw, *_ in seen] == frames
    assert [(cap, orig) for _, cap, orig, _ in seen] == [(len(f), len(f)) for f in frames]
    assert [epoch for *_, epoch in seen] == [f"{s // 10**9}.{s % 10**9:09d}" for s in stamps]

    via_scapy = scapy_frames(path)
    assert [raw for raw, _, _ in via_scapy] == frames
    # scapy keeps pcapng timestamps as exact decimals.
    assert [int(t * 10**9) for _, _, t in via_scapy] == stamps

    info = capinfos(path)
    assert "Name = vtapdum0" in info
    assert "Time precision = nanoseconds (9)" in info
    assert "Capture application: vtap" in info


def test_snaplen_truncates_and_keeps_original_length(tmp_path):
    path = tmp_path / "snap.pcapng"
    frames = [bytes(range(256)) * 6, b"\x01" * 50, b"\x02" * 64, b"\x03" * 65]
    with PcapngWriter.create(str(path), snaplen=64) as writer:
        for frame in frames:
            writer.write(frame)

    seen = tshark_frames(path)
    assert [raw for raw, *_ in seen] == [f[:64] for f in frames]
    assert [(cap, orig) for _, cap, orig, _ in seen] == [(64, 1536), (50, 50), (64, 64), (64, 65)]
    assert [(raw, wirelen) for raw, wirelen, _ in scapy_frames(path)] == [(f[:64], len(f)) for f in frames]
    assert "Capture length = 64" in capinfos(path)


def test_append_adds_a_section_that_readers_see_as_one_file(tmp_path):
    path = tmp_path / "twice.pcapng"
    first, second = some_frames(10, seed=1), some_frames(12, seed=2)
    with PcapngWriter.create(str(path), if_name="a") as writer:
        for frame in first:
            writer.write(frame)
    with PcapngWriter.create(str(path), if_name="b", append=True) as writer:
        for frame in second:
            writer.write(frame)

    assert [raw for raw, *_ in tshark_frames(path)] == first + second
    assert [raw for raw, _, _ in scapy_frames(path)] == first + second


def test_append_refuses_a_file_that_is_not_pcapng_and_leaves_it_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a capture\n")
    path.chmod(0o600)  # private and ours: refused only for not being pcapng
    with pytest.raises(ValidationError, match="not a pcapng file"):
        PcapngWriter.create(str(path), append=True)
    assert path.read_bytes() == b"not a capture\n"


def test_flush_makes_frames_readable_while_the_file_is_open(tmp_path):
    path = tmp_path / "live.pcapng"
    writer = PcapngWriter.create(str(path))
    writer.write(b"\xaa" * 60)
    writer.flush()
    try:
        assert [raw for raw, *_ in tshark_frames(path)] == [b"\xaa" * 60]
    finally:
        writer.close()


def test_rotation_keeps_at_most_max_files_each_a_valid_pcapng_no_bigger_than_max_size(tmp_path):
    path = tmp_path / "ring.pcapng"
    frames = [bytes([i % 256]) * 1000 for i in range(100)]
    (path.parent / "ring.pcapng.3").write_bytes(b"beyond max_files: not vtap's to delete")
    with PcapngWriter.create(str(path), max_size=10_000, max_files=3) as writer:
        for frame in frames:
            writer.write(frame, timestamp_ns=1)
    kept = [path, tmp_path / "ring.pcapng.1", tmp_path / "ring.pcapng.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + ["ring.pcapng.3"])
    # Each file is complete on its own; together, oldest first, they hold the newest frames in order.
    newest_first = [[raw for raw, *_ in tshark_frames(p)] for p in kept]
    assert all(p.stat().st_size <= 10_000 and p.stat().st_mode & 0o777 == 0o600 for p in kept)
    together = [raw for frames_of_file in reversed(newest_first) for raw in frames_of_file]
    assert together == frames[-len(together) :]
    assert len(together) >= 2 * 9  # two full files at least (9 frames of 1032 bytes fit in 10,000)


def test_rotation_refuses_a_symlink_planted_at_the_path(tmp_path, monkeypatch):
    import os

    path = tmp_path / "x.pcapng"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    writer = PcapngWriter.create(str(path), max_size=4096, max_files=2)
    writer.write(b"a" * 3000, timestamp_ns=1)
    real_replace = os.replace

    def replace_then_plant(src, dst):
        real_replace(src, dst)
        if str(src) == str(path):
            path.symlink_to(victim)  # someone races the rotation: a link where the new file goes

    monkeypatch.setattr(os, "replace", replace_then_plant)
    with pytest.raises(FileExistsError):
        writer.write(b"b" * 3000, timestamp_ns=2)
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "x.pcapng.1").stat().st_size > 3000  # the full file was kept
