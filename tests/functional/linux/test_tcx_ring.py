"""The ring-writing tcx program (a pcap sink on datapath=tcx) run by the kernel: BPF_PROG_TEST_RUN.

Each test loads the translated program against a real BPF ring buffer, runs it
on frames, reads the records back with bpfring.RingReader, writes them as
pcapng and reads the file with tshark: what a capture would hold.
"""

import os

import pytest

from test_capture import read_frames
from vtap_core import filters
from vtap_drivers.linux import bpfring, bpfsys, tcxprog
from vtap_drivers.linux.pcapng import PcapngWriter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads eBPF programs and ring buffers (bpf(2))")

MAC = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"


def udp_frame(dport, payload):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000, dport=dport) / payload)


@pytest.fixture
def ring_at(tmp_path):
    """make(size) -> the path of a fresh ring pinned in a private folder of bpffs, unpinned afterwards."""
    bpfsys.ensure_bpffs()
    folder = os.path.join(bpfsys.BPFFS, f"vtap-test-{os.getpid()}-{tmp_path.name[-20:]}")
    os.mkdir(folder, 0o700)
    made = []

    def make(size=1 << 20):
        path = bpfring.ring_path(folder, f"sink{len(made)}")
        with bpfring.create("vtap_test", size) as ring:
            bpfsys.pin(ring, path)
        made.append(path)
        return path

    yield make
    for path in made:
        bpfring.remove(path)
    os.rmdir(folder)


def load(expression, reader, snaplen=None, direction=bpfring.DIRECTION_IN):
    return tcxprog.load_mirror(filters.compile_filter(expression), 0, "ringtest", ring=tcxprog.RingAction(reader.ring.fileno(), snaplen, direction))


def drain_to_file(reader, path, snaplen=None):
    with PcapngWriter.create(str(path), snaplen=snaplen) as writer:
        while reader.available():
            parts, count = reader.read()
            writer.write_epbs(parts, count)
            reader.release()
    return read_frames(path)


def test_matching_frames_are_written_whole_and_counted_others_not_at_all(ring_at, tmp_path):
    reader = bpfring.RingReader(ring_at())
    sent = [udp_frame(9, b"m" * size) for size in (18, 100, 1000, 1400)]
    with load("udp port 9", reader) as mirror:
        for frame in sent + [udp_frame(10, b"n" * 50)]:
            assert bpfsys.run_on_frame(mirror.prog, frame).retval == tcxprog.TCX_NEXT
        counters = mirror.read_counters()
    assert counters == {"packets": 4, "bytes": sum(map(len, sent)), "clone_failures": 0}
    assert drain_to_file(reader, tmp_path / "all.pcapng") == [(frame, len(frame)) for frame in sent]
    reader.close()


def test_frames_longer_than_snaplen_are_cut_and_keep_their_length(ring_at, tmp_path):
    reader = bpfring.RingReader(ring_at(), snaplen=100)
    sent = [udp_frame(9, b"s" * size) for size in (10, 58, 59, 500, 3000)]
    with load("", reader, snaplen=100) as mirror:
        for frame in sent:
            bpfsys.run_on_frame(mirror.prog, frame)
    assert drain_to_file(reader, tmp_path / "snap.pcapng", snaplen=100) == [(frame[:100], len(frame)) for frame in sent]
    assert tcxprog.ring_size_classes(100) == [64, 100]
    assert tcxprog.ring_size_classes(None)[-1] == tcxprog.RING_LARGEST


def test_a_full_ring_counts_each_lost_copy_and_keeps_what_it_took(ring_at, tmp_path):
    reader = bpfring.RingReader(ring_at(bpfring.PAGE))  # one page: a few records fit
    sent = [udp_frame(9, bytes([i]) * 60) for i in range(100)]
    with load("", reader) as mirror:
        for frame in sent:
            bpfsys.run_on_frame(mirror.prog, frame)
        counters = mirror.read_counters()
    kept = drain_to_file(reader, tmp_path / "full.pcapng")
    assert 0 < counters["packets"] < len(sent)
    assert counters["packets"] + counters["clone_failures"] == len(sent)
    assert kept == [(frame, len(frame)) for frame in sent[: counters["packets"]]]
    with load("", reader) as mirror:  # the room read back is free again
        bpfsys.run_on_frame(mirror.prog, sent[0])
        assert mirror.read_counters()["packets"] == 1
    reader.close()


def test_no_reserve_fails_while_a_reader_keeps_the_ring_nearly_empty(ring_at):
    """The reader in another process on another CPU, the program run ~500k times a second: every record
    fits, so not one may be refused. (With the consumer position stored through struct.pack_into("=Q") the
    kernel refused ~5 in a million with the ring nearly empty.)"""
    import ctypes
    import struct
    import subprocess
    import sys
    import time

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: the reader and the writer side by side")
    cpus = sorted(os.sched_getaffinity(0))
    path = ring_at(64 << 20)
    ring_fd = bpfsys.get_pinned(path)
    reader_code = f"""
import os, signal, time
os.sched_setaffinity(0, {{{cpus[0]}}})
from vtap_drivers.linux import bpfring
reader, stop, read = bpfring.RingReader({path!r}), [], 0
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
while not stop or reader.available():
    if reader.available():
        read += reader.read()[1]
        reader.release()
    else:
        time.sleep(0.002)
print(read, flush=True)
"""
    reader = subprocess.Popen([sys.executable, "-c", reader_code], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    frame = udp_frame(9, b"r" * 18)
    data_in = ctypes.create_string_buffer(frame, len(frame))
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[-1]})
    try:
        with tcxprog.load_mirror(filters.compile_filter(""), 0, "ringtest", ring=tcxprog.RingAction(ring_fd.fileno(), None, 1)) as mirror:
            attr = struct.pack("=IIIIQQII", mirror.prog.fileno(), 0, len(frame), 0, ctypes.addressof(data_in), 0, 100, 0)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                bpfsys.bpf(bpfsys.PROG_TEST_RUN, attr)  # 100 runs a call
                time.sleep(0.0001)
            counters = mirror.read_counters()
    finally:
        os.sched_setaffinity(0, affinity)
        reader.terminate()
        read = int(reader.communicate(timeout=10)[0].strip())
        ring_fd.close()
    assert counters["packets"] > 100_000
    assert counters["clone_failures"] == 0
    assert read == counters["packets"]
