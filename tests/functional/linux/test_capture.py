"""The pcap target's capture process, on a real sink device in a fresh network namespace.

Most tests use a veth pair as the sink (this kernel has no `dummy`): copies
are transmitted on one end, which is the end the capture process reads.
Frames are sent with AF_PACKET or mirrored with tc in the test's own setup.
The last test drives a pcap: session end to end (SDK, linux driver, its ifb
sink). What the file holds is read back with tshark.
"""

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from vtap_core.client import Client
from vtap_core.errors import OperationFailed, ValidationError
from vtap_drivers.linux.capture import capture_device, running_captures, start_capture_process, stop_capture_process

SINK, SINK_PEER = "vtcsink0", "vtcsink1"
MATCH_ALL = "1,6 0 0 262144"  # classic BPF "ret #262144" (this kernel has cls_bpf, not matchall)
# Long enough for a new sink with an IPv6 address to send its router solicitation (seen at ~3.3 s).
IPV6_CHATTER_WINDOW = 5.0


def ip(netns, *args):
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


def veth(netns, a, b):
    """A veth pair without IPv6 addresses, so neither end sends frames of its own."""
    ip(netns, "link", "add", a, "type", "veth", "peer", "name", b)
    for end in (a, b):
        ip(netns, "link", "set", end, "addrgenmode", "none")
        ip(netns, "link", "set", end, "up")


def packet_socket(netns, device):
    from pyroute2 import netns as pr_netns

    sock = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    sock.bind((device, 0))
    return sock


def read_frames(path):
    """[(raw bytes, original length)] as tshark reads the file."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x"], check=True, capture_output=True, text=True).stdout
    return [(bytes.fromhex(p["_source"]["layers"]["frame_raw"][0]), int(p["_source"]["layers"]["frame"]["frame.len"])) for p in json.loads(out)]


def interfaces_in(path):
    out = subprocess.run(["capinfos", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split("Number of interfaces in file:")[1].split()[0])


def frames(count, seed, src=b"\x02\x00\x00\x00\x00\x01", vlan=None):
    """Ethernet frames with the local-experimental ethertype and random payloads of varied size."""
    rng = random.Random(seed)
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return [b"\xff" * 6 + src + tag + b"\x88\xb5" + rng.randbytes(rng.randint(46, 1400)) for _ in range(count)]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def sink(netns):
    veth(netns, SINK, SINK_PEER)
    return netns


@pytest.fixture
def state_dir(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    yield str(folder)
    for name in running_captures(str(folder)):
        stop_capture_process(name, str(folder))


def test_frames_transmitted_on_the_sink_are_recorded_and_readable_while_running(sink, state_dir, tmp_path):
    path = tmp_path / "web.pcapng"
    pid = start_capture_process("web", SINK, str(path), netns=sink, state_dir=state_dir)
    assert alive(pid)
    assert open(os.path.join(state_dir, "capture-web.pid")).read().strip() == str(pid)

    sent = frames(30, seed=1)
    out = packet_socket(sink, SINK)
    for frame in sent:
        out.send(frame)
    # The peer's frames arrive on the sink from outside: they are not copies and must not be recorded.
    packet_socket(sink, SINK_PEER).send(frames(1, seed=9, src=b"\x02\x00\x00\x00\x00\x99")[0])

    assert wait_for(lambda: len(read_frames(path)) >= len(sent)), "frames did not reach the file while the capture ran"
    assert read_frames(path) == [(f, len(f)) for f in sent]

    assert stop_capture_process("web", state_dir) is True
    assert not alive(pid)
    assert not os.path.exists(os.path.join(state_dir, "capture-web.pid"))
    assert running_captures(state_dir) == {}
    assert read_frames(path) == [(f, len(f)) for f in sent]
    assert stop_capture_process("web", state_dir) is False


def test_tc_mirrored_copies_keep_their_vlan_tag_and_are_cut_to_snaplen(sink, state_dir, tmp_path):
    # A source pair whose ingress is mirrored to the sink with tc, as the data path does.
    veth(sink, "vtcsrc0", "vtcsrc1")
    subprocess.run(["tc", "-n", sink, "qdisc", "add", "dev", "vtcsrc1", "clsact"], check=True)
    subprocess.run(["tc", "-n", sink, "filter", "add", "dev", "vtcsrc1", "ingress", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", SINK], check=True)
    path = tmp_path / "snap.pcapng"
    start_capture_process("snap", SINK, str(path), snaplen=64, netns=sink, state_dir=state_dir)

    # The kernel moves a received 802.1Q tag into packet metadata; the file must show it again.
    sent = frames(10, seed=2) + frames(5, seed=3, vlan=101)
    source = packet_socket(sink, "vtcsrc0")
    for frame in sent:
        source.send(frame)

    assert wait_for(lambda: len(read_frames(path)) >= len(sent))
    stop_capture_process("snap", state_dir)
    assert read_frames(path) == [(f[:64], len(f)) for f in sent]
    assert "Capture length = 64" in subprocess.run(["capinfos", str(path)], capture_output=True, text=True).stdout


def test_start_is_idempotent_and_new_parameters_restart_into_a_new_section(sink, state_dir, tmp_path):
    path = tmp_path / "again.pcapng"
    first = start_capture_process("again", SINK, str(path), netns=sink, state_dir=state_dir)
    assert start_capture_process("again", SINK, str(path), netns=sink, state_dir=state_dir) == first
    assert len(running_captures(state_dir)) == 1

    before = frames(3, seed=4)
    out = packet_socket(sink, SINK)
    for frame in before:
        out.send(frame)
    assert wait_for(lambda: len(read_frames(path)) == 3)

    second = start_capture_process("again", SINK, str(path), snaplen=100, netns=sink, state_dir=state_dir)
    assert second != first and not alive(first)
    assert running_captures(state_dir) == {"again": {"pid": second, "device": SINK, "path": str(path), "snaplen": 100, "netns": sink}}
    after = frames(3, seed=5)
    for frame in after:
        out.send(frame)
    assert wait_for(lambda: len(read_frames(path)) == 6)
    stop_capture_process("again", state_dir)
    # Restarting appended a section: nothing captured before was lost.
    assert read_frames(path) == [(f, len(f)) for f in before] + [(f[:100], len(f)) for f in after]
    assert interfaces_in(path) == 2


def test_a_process_whose_pidfile_was_lost_is_still_found_and_stopped(sink, state_dir, tmp_path):
    pid = start_capture_process("lost", SINK, str(tmp_path / "lost.pcapng"), netns=sink, state_dir=state_dir)
    os.unlink(os.path.join(state_dir, "capture-lost.pid"))
    assert running_captures(state_dir)["lost"]["pid"] == pid
    # Another state dir's view does not include it.
    other = tmp_path / "other"
    other.mkdir()
    assert running_captures(str(other)) == {}
    assert stop_capture_process("lost", state_dir) is True
    assert not alive(pid)


def test_after_a_crash_the_file_keeps_its_frames_and_a_new_start_appends(sink, state_dir, tmp_path):
    path = tmp_path / "crash.pcapng"
    pid = start_capture_process("crash", SINK, str(path), netns=sink, state_dir=state_dir)
    sent = frames(4, seed=6)
    out = packet_socket(sink, SINK)
    for frame in sent:
        out.send(frame)
    assert wait_for(lambda: len(read_frames(path)) == 4)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid))
    assert running_captures(state_dir) == {}

    restarted = start_capture_process("crash", SINK, str(path), netns=sink, state_dir=state_dir)
    assert restarted != pid
    out.send(sent[0])
    assert wait_for(lambda: len(read_frames(path)) == 5)
    assert read_frames(path) == [(f, len(f)) for f in sent + sent[:1]]


def test_a_recreated_sink_is_followed_by_name(sink, state_dir, tmp_path):
    path = tmp_path / "follow.pcapng"
    start_capture_process("follow", SINK, str(path), netns=sink, state_dir=state_dir)
    ip(sink, "link", "del", SINK)
    veth(sink, SINK, SINK_PEER)
    sent = frames(3, seed=7)

    def recorded():
        # Until the process has noticed the new device, frames sent now are not seen: keep sending.
        packet_socket(sink, SINK).send(sent[0])
        return len(read_frames(path)) > 0

    assert wait_for(recorded, timeout=5)
    assert {raw for raw, _ in read_frames(path)} == {sent[0]}


def test_bad_input_is_refused_and_starts_nothing(sink, state_dir, tmp_path):
    with pytest.raises(ValidationError, match="^target: .*folder .* does not exist"):
        start_capture_process("bad", SINK, str(tmp_path / "missing" / "x.pcapng"), netns=sink, state_dir=state_dir)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"keep me\n")
    notes.chmod(0o600)
    with pytest.raises(ValidationError, match="^target: .*not a pcapng file"):
        start_capture_process("bad", SINK, str(notes), netns=sink, state_dir=state_dir)
    assert notes.read_bytes() == b"keep me\n"
    with pytest.raises(ValidationError, match="^snaplen: "):
        start_capture_process("bad", SINK, str(tmp_path / "x.pcapng"), snaplen=0, netns=sink, state_dir=state_dir)
    with pytest.raises(ValidationError, match="^capture name: "):
        start_capture_process("bad name", SINK, str(tmp_path / "x.pcapng"), netns=sink, state_dir=state_dir)
    with pytest.raises(OperationFailed, match="device nosuch0: no such device in netns"):
        start_capture_process("bad", "nosuch0", str(tmp_path / "x.pcapng"), netns=sink, state_dir=state_dir)
    assert running_captures(state_dir) == {}
    assert not (tmp_path / "x.pcapng").exists()
    assert not os.path.exists(os.path.join(state_dir, "capture-bad.pid"))


def test_the_sink_going_down_and_up_does_not_end_the_capture(sink, state_dir, tmp_path):
    path = tmp_path / "downup.pcapng"
    pid = start_capture_process("downup", SINK, str(path), netns=sink, state_dir=state_dir)
    ip(sink, "link", "set", SINK, "down")
    time.sleep(0.3)  # the socket reports ENETDOWN in the meantime
    ip(sink, "link", "set", SINK, "up")
    sent = frames(2, seed=8)
    out = packet_socket(sink, SINK)
    for frame in sent:
        out.send(frame)
    assert wait_for(lambda: len(read_frames(path)) == 2)
    assert alive(pid)
    assert read_frames(path) == [(f, len(f)) for f in sent]


def test_capture_device_in_process_stops_after_count(sink, tmp_path):
    path = tmp_path / "inline.pcapng"
    result = {}
    worker = threading.Thread(target=lambda: result.update(n=capture_device(SINK, str(path), netns=sink, count=3)))
    worker.start()
    assert wait_for(lambda: path.exists())
    sent = frames(5, seed=10)
    out = packet_socket(sink, SINK)
    for frame in sent:
        out.send(frame)
    worker.join(timeout=5)
    assert result == {"n": 3}
    assert read_frames(path) == [(f, len(f)) for f in sent[:3]]


def test_pcap_session_records_exactly_the_mirrored_frames_for_as_long_as_it_lives(netns, state_dir, tmp_path):
    # src0 is the mirrored interface: frames sent on peer0 arrive at src0, its "in".
    veth(netns, "src0", "peer0")
    peer = packet_socket(netns, "peer0")
    state_dir = tmp_path / "state"  # the fixture's folder: it stops what a failing test leaves running
    path = tmp_path / "web.pcapng"

    def client():
        return Client(driver="linux", state=str(state_dir / "vtap.db"), netns=netns)

    def send(batch):
        for frame in batch:
            peer.send(frame)

    with client() as vtap:
        vtap.create_session("web", to=f"pcap:{path}", snaplen=64)
        vtap.add_flow("web", interface="src0", direction="in")
        (first_pid,) = [c["pid"] for c in running_captures(str(state_dir)).values()]
        first = frames(5, seed=11) + frames(2, seed=12, vlan=7)
        send(first)
        assert wait_for(lambda: len(read_frames(path)) == len(first))
        (row,) = vtap.status()
        assert (row.state, row.packets) == ("active", len(first))
    # The capture belongs to the session, not to the command that created it.
    assert alive(first_pid)

    with client() as vtap:
        vtap.set_session_enabled("web", False)
        assert not alive(first_pid) and running_captures(str(state_dir)) == {}
        send(frames(2, seed=13))  # disabled: not recorded

        vtap.set_session_enabled("web", True)
        sink_created = time.monotonic()
        (second_pid,) = [c["pid"] for c in running_captures(str(state_dir)).values()]
        os.kill(second_pid, signal.SIGKILL)
        assert wait_for(lambda: not alive(second_pid))
        plan = vtap.reconcile()  # what `vtap follow` does periodically
        assert [b.key for b in plan.add] == [b.key for b in vtap.driver.observe() if b.get("type") == "capture"]
        (third_pid,) = [c["pid"] for c in running_captures(str(state_dir)).values()]
        assert third_pid != second_pid
        second = frames(4, seed=14)
        send(second)
        assert wait_for(lambda: len(read_frames(path)) == len(first) + len(second))

        time.sleep(max(0.0, IPV6_CHATTER_WINDOW - (time.monotonic() - sink_created)))
        vtap.delete_session("web")
        assert not alive(third_pid) and running_captures(str(state_dir)) == {}
    assert "vtap" not in ip(netns, "-o", "link", "show", "type", "ifb")

    # Nothing but the copies: no frame the sink sent of its own, none from the disabled time.
    assert read_frames(path) == [(f[:64], len(f)) for f in first + second]


def test_a_sink_whose_capture_died_is_shown_mended_in_place_and_deleted_with_its_session(netns, state_dir, tmp_path):
    # Before, observe skipped such a sink: status did not say why, and a delete left the ifb behind, unseen.
    veth(netns, "src0", "peer0")
    peer = packet_socket(netns, "peer0")
    path = tmp_path / "web.pcapng"
    with Client(driver="linux", state=str(tmp_path / "state" / "vtap.db"), netns=netns) as vtap:
        vtap.create_session("web", to=f"pcap:{path}")
        vtap.add_flow("web", interface="src0", direction="in")
        sink_before = ip(netns, "-o", "link", "show", "type", "ifb")
        for _ in range(2):
            (pid,) = [c["pid"] for c in running_captures(str(tmp_path / "state")).values()]
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not alive(pid))
            (row,) = vtap.status()
            assert row.state == "partial" and "no capture process" in row.problem
            if sink_before is None:
                break
            plan = vtap.reconcile()  # the capture is started again; the sink and the mirror stay as they are
            assert not plan.remove and [b.get("type") for b in plan.add] == ["capture"]
            assert ip(netns, "-o", "link", "show", "type", "ifb") == sink_before
            sent = frames(3, seed=21)
            for frame in sent:
                peer.send(frame)
            assert wait_for(lambda: len(read_frames(path)) == len(sent))
            assert vtap.status()[0].state == "active"
            sink_before = None
        vtap.delete_session("web")
        assert vtap.driver.observe() == []
    assert "vtap" not in ip(netns, "-o", "link", "show", "type", "ifb")
