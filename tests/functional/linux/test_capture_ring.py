"""The pcap capture at rate: the TPACKET_V3 ring, draining on stop, the sink's queue, drops in status.

Frames are mirrored with tc from a veth pair into the sink (a veth end in the
ring tests, the session's own ifb in the session tests) and counted in the
file with capinfos (Wireshark's, independent of vtap's writer).
"""

import os
import signal
import subprocess
import time

from test_capture import MATCH_ALL, frames, packet_socket, read_frames, sink, state_dir, veth, wait_for  # noqa: F401 (fixtures)
from vtap_core.client import Client
from vtap_drivers.linux.capture import capture_counts, running_captures, start_capture_process, stop_capture_process
from vtap_drivers.linux.ring import PacketRing

SINK, SINK_PEER = "vtcsink0", "vtcsink1"


def mirrored_source(netns, to_device):
    """A veth pair whose far end's ingress is mirrored to `to_device`; returns a socket sending into it."""
    veth(netns, "vtcsrc0", "vtcsrc1")
    subprocess.run(["tc", "-n", netns, "qdisc", "add", "dev", "vtcsrc1", "clsact"], check=True)
    subprocess.run(["tc", "-n", netns, "filter", "add", "dev", "vtcsrc1", "ingress", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", to_device], check=True)
    return packet_socket(netns, "vtcsrc0")


def numbered(count, size=64):
    """Distinct frames: a sequence number in the payload."""
    return [b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + i.to_bytes(4, "big") + b"\0" * (size - 18) for i in range(count)]


def frames_in(path):
    out = subprocess.run(["capinfos", "-M", "-c", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split("Number of packets:")[1].split()[0])


def test_the_ring_holds_only_transmitted_frames_with_their_vlan_tags_cut_to_snaplen(sink):
    source = mirrored_source(sink, SINK)
    ring = PacketRing(SINK, netns=sink, snaplen=60)
    try:
        sent = frames(20, seed=21) + frames(5, seed=22, vlan=42)
        for frame in sent:
            source.send(frame)
        # Arriving at the sink from its peer: not a copy, never in the ring.
        packet_socket(sink, SINK_PEER).send(frames(1, seed=23, src=b"\x02\x00\x00\x00\x00\x99")[0])
        seen = []
        stop_after = time.monotonic() + 2.0
        for block in ring.blocks(lambda: time.monotonic() > stop_after or len(seen) >= len(sent) + 1):
            seen += [(bytes(frame), length) for frame, _ts, length in block]
        # The kernel copies at most snaplen bytes; a tag put back adds its 4 to both lengths.
        assert seen == [(f[:60] if i < 20 else f[:64], len(f)) for i, f in enumerate(sent)]
        received, dropped, _full = ring.statistics()
        assert (received, dropped) == (len(sent), 0)
    finally:
        ring.close()


def test_every_frame_sent_before_stop_is_in_the_file(sink, state_dir, tmp_path):
    path = tmp_path / "drain.pcapng"
    source = mirrored_source(sink, SINK)
    start_capture_process("drain", SINK, str(path), netns=sink, state_dir=state_dir)
    sent = numbered(30000)
    for frame in sent:
        source.send(frame)
    # Stopped at once: what is still in the ring must reach the file before the process ends.
    assert stop_capture_process("drain", state_dir) is True
    assert frames_in(path) == len(sent)


def test_a_pcap_sessions_sink_has_no_queue_and_every_lost_copy_is_counted_in_status(netns, tmp_path):
    veth(netns, "src0", "peer0")
    peer = packet_socket(netns, "peer0")
    state = tmp_path / "state"
    path = tmp_path / "lossy.pcapng"
    with Client(driver="linux", state=str(state / "vtap.db"), netns=netns) as vtap:
        try:
            vtap.create_session("lossy", to=f"pcap:{path}")
            vtap.add_flow("lossy", interface="src0", direction="in")
            ((sink_name, process),) = running_captures(str(state)).items()
            qdiscs = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", sink_name], check=True, capture_output=True, text=True).stdout
            assert qdiscs.startswith("qdisc noqueue"), qdiscs

            # A capture that does not read (stopped for real) fills its ring: the kernel drops the rest.
            os.kill(process["pid"], signal.SIGSTOP)
            sent = numbered(80000, size=1400)
            try:
                for frame in sent:
                    peer.send(frame)
            finally:
                os.kill(process["pid"], signal.SIGCONT)

            def settled():
                counts = capture_counts(str(state), sink_name) or {}
                # lost in the AF_PACKET ring, or (a mirror writing into the sink's BPF ring) in that ring
                return counts.get("frames", 0) + counts.get("ring_dropped", 0) + counts.get("bpf_ring_dropped", 0) == len(sent)

            assert wait_for(settled, timeout=15)
            (row,) = vtap.status()
            if "bpf_ring_frames" in capture_counts(str(state), sink_name):  # a ring writer counts what it wrote, and apart what found the ring full
                assert row.packets + row.dropped == len(sent)
            else:
                assert row.packets == len(sent)  # every copy left the mirrored device
            assert row.capture_dropped > 0
            vtap.delete_session("lossy")
            # Nothing is lost silently: what is not in the file is the count status showed.
            assert frames_in(path) + row.capture_dropped == len(sent)
        finally:
            for name in running_captures(str(state)):
                stop_capture_process(name, str(state))


def test_a_rotating_pcap_session_keeps_at_most_max_files_of_at_most_max_size(netns, tmp_path):
    veth(netns, "src0", "peer0")
    peer = packet_socket(netns, "peer0")
    state = tmp_path / "state"
    path = tmp_path / "rot.pcapng"
    sent = numbered(200, size=1000)
    with Client(driver="linux", state=str(state / "vtap.db"), netns=netns) as vtap:
        try:
            vtap.create_session("rot", to=f"pcap:{path}?max_size=20000&max_files=3")
            assert str(vtap.store.sessions()[0].target) == f"pcap:{path}?max_size=20000&max_files=3"
            vtap.add_flow("rot", interface="src0", direction="in")
            for frame in sent:
                peer.send(frame)
            vtap.delete_session("rot")
        finally:
            for name in running_captures(str(state)):
                stop_capture_process(name, str(state))
    kept = [path, tmp_path / "rot.pcapng.1", tmp_path / "rot.pcapng.2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("rot")) == sorted(p.name for p in kept)
    assert all(p.stat().st_size <= 20000 and p.stat().st_mode & 0o777 == 0o600 for p in kept)
    # Each file is a pcapng file of its own; oldest first, they hold the newest frames, none missing.
    together = [raw for p in reversed(kept) for raw, _length in read_frames(p)]
    assert len(together) >= 2 * 19 and together == sent[-len(together) :]


def test_a_capture_stops_even_while_frames_keep_coming(sink, tmp_path):
    import threading

    from vtap_drivers.linux.capture import capture_device

    source = mirrored_source(sink, SINK)
    flooding = threading.Event()
    flooding.set()

    def flood():
        frame = numbered(1)[0]
        while flooding.is_set():
            source.send(frame)

    stop = threading.Event()
    result = {}
    worker = threading.Thread(target=lambda: result.update(n=capture_device(SINK, str(tmp_path / "busy.pcapng"), netns=sink, stop=stop)))
    sender = threading.Thread(target=flood)
    worker.start()
    sender.start()
    try:
        time.sleep(1.0)
        stop.set()
        # The ring is never empty, yet the capture ends: it drains for at most a few seconds.
        worker.join(timeout=6)
        assert not worker.is_alive()
    finally:
        flooding.clear()
        sender.join()
        stop.set()
        worker.join()
    assert result["n"] > 0 and frames_in(tmp_path / "busy.pcapng") == result["n"]
