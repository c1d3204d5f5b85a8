"""A pcap: session end to end, as a user drives it: SDK + linux driver + tc + the capture process.

In the test's namespace: src0 is the mirrored interface (frames sent on its
peer arrive at src0: its "in"); vtap creates the sink and the capture process.
The file must hold exactly the mirrored frames, cut to snaplen, across
disable/enable, a killed capture process, and the Client going away.
"""

import json
import os
import random
import signal
import socket
import subprocess
import time

from vtap_core.client import Client
from vtap_drivers.linux.capture import running_captures

# Long enough for a new sink with an IPv6 address to send its router solicitation (seen at ~3.3 s).
IPV6_CHATTER_WINDOW = 5.0


def ip(netns, *args):
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


def read_frames(path):
    out = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x"], check=True, capture_output=True, text=True).stdout
    return [(bytes.fromhex(p["_source"]["layers"]["frame_raw"][0]), int(p["_source"]["layers"]["frame"]["frame.len"])) for p in json.loads(out)]


def frames(count, seed, vlan=None):
    rng = random.Random(seed)
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return [b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x05" + tag + b"\x88\xb5" + rng.randbytes(rng.randint(46, 1400)) for _ in range(count)]


def send(netns, device, batch):
    from pyroute2 import netns as pr_netns

    with pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0) as sock:
        sock.bind((device, 0))
        for frame in batch:
            sock.send(frame)


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


def test_pcap_session_records_exactly_the_mirrored_frames_for_as_long_as_it_lives(netns, tmp_path):
    ip(netns, "link", "add", "src0", "type", "veth", "peer", "name", "peer0")
    for end in ("src0", "peer0"):
        ip(netns, "link", "set", end, "addrgenmode", "none")
        ip(netns, "link", "set", end, "up")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    path = tmp_path / "web.pcapng"

    def client():
        return Client(driver="linux", state=str(state_dir / "vtap.db"), netns=netns)

    with client() as vtap:
        vtap.create_session("web", to=f"pcap:{path}", snaplen=64)
        vtap.add_flow("web", interface="src0", direction="in")
        (first_pid,) = [c["pid"] for c in running_captures(str(state_dir)).values()]
        first = frames(5, seed=1) + frames(2, seed=2, vlan=7)
        send(netns, "peer0", first)
        assert wait_for(lambda: len(read_frames(path)) == len(first))
        (row,) = vtap.status()
        assert (row.state, row.packets) == ("active", len(first))
    # The capture belongs to the session, not to the command that created it.
    assert alive(first_pid)

    with client() as vtap:
        vtap.set_session_enabled("web", False)
        assert not alive(first_pid) and running_captures(str(state_dir)) == {}
        send(netns, "peer0", frames(2, seed=3))  # disabled: not recorded

        vtap.set_session_enabled("web", True)
        sink_created = time.monotonic()
        (second_pid,) = [c["pid"] for c in running_captures(str(state_dir)).values()]
        os.kill(second_pid, signal.SIGKILL)
        assert wait_for(lambda: not alive(second_pid))
        plan = vtap.reconcile()  # what `vtap follow` does periodically
        assert [b.key for b in plan.add] == [b.key for b in vtap.driver.observe() if b.get("type") == "capture"]
        (third_pid,) = [c["pid"] for c in running_captures(str(state_dir)).values()]
        assert third_pid != second_pid
        second = frames(4, seed=4)
        send(netns, "peer0", second)
        assert wait_for(lambda: len(read_frames(path)) == len(first) + len(second))

        time.sleep(max(0.0, IPV6_CHATTER_WINDOW - (time.monotonic() - sink_created)))
        vtap.delete_session("web")
        assert not alive(third_pid) and running_captures(str(state_dir)) == {}
    assert "vtap" not in ip(netns, "-o", "link", "show", "type", "ifb")

    # Nothing but the copies: no frame the sink sent of its own, none from the disabled time.
    assert read_frames(path) == [(f[:64], len(f)) for f in first + second]
