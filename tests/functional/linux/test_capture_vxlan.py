"""`vtap capture --listen vxlan://...`: a VXLAN stream terminated into pcapng, in real namespaces.

A sender namespace holds a kernel vxlan device (or a plain UDP socket for
hand-made packets); the receiver namespace runs capture_vxlan. The file is
read back with tshark and compared byte for byte with what was sent.
"""

import json
import random
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest

from vtap_core.errors import OperationFailed, ValidationError
from vtap_drivers.linux.capture import capture_vxlan

SENDER_IP, RECEIVER_IP = "10.231.7.1", "10.231.7.2"


def ip(netns, *args):
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def read_frames(path):
    out = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x"], check=True, capture_output=True, text=True).stdout
    return [bytes.fromhex(p["_source"]["layers"]["frame_raw"][0]) for p in json.loads(out)]


def frames(count, seed, largest=1464):
    """Inner Ethernet frames; 1464 bytes is the most a 1500-byte underlay carries in VXLAN."""
    rng = random.Random(seed)
    return [rng.randbytes(6) + b"\x02\x00\x00\x00\x00\x07\x88\xb5" + rng.randbytes(rng.randint(46, largest - 14)) for _ in range(count)]


def vxlan_packet(vni, frame, flags=0x08):
    return struct.pack("!B3xI", flags, vni << 8) + frame


@pytest.fixture
def link(netns):
    """(sender netns, receiver netns), joined by a veth; the sender has vxlan device vtcvx0 (VNI 42)."""
    sender = f"vtcvs-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", sender], check=True)
    try:
        ip(sender, "link", "add", "vtcu0", "type", "veth", "peer", "name", "vtcu1", "netns", netns)
        ip(sender, "addr", "add", f"{SENDER_IP}/24", "dev", "vtcu0")
        ip(netns, "addr", "add", f"{RECEIVER_IP}/24", "dev", "vtcu1")
        ip(sender, "link", "set", "vtcu0", "up")
        ip(netns, "link", "set", "vtcu1", "up")
        ip(sender, "link", "add", "vtcvx0", "type", "vxlan", "id", "42", "remote", RECEIVER_IP, "local", SENDER_IP, "dstport", "4789", "dev", "vtcu0")
        # No IPv6 address: the vxlan device must carry only the test's frames.
        ip(sender, "link", "set", "vtcvx0", "addrgenmode", "none")
        ip(sender, "link", "set", "vtcvx0", "up")
        yield sender, netns
    finally:
        subprocess.run(["ip", "netns", "del", sender], check=False)


def socket_in(netns, family, kind, proto=0):
    from pyroute2 import netns as pr_netns

    return pr_netns.create_socket(netns, family, kind, proto, flags=0)


def listening(netns, port):
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Huln", f"sport = :{port}"], capture_output=True, text=True).stdout
    return bool(out.strip())


class Capture(threading.Thread):
    """capture_vxlan running in the background, as `vtap capture` runs in a terminal."""

    def __init__(self, netns, listen, path, port=4789, **options):
        super().__init__(daemon=True)
        self.args = (listen, str(path))
        self.options = dict(options, netns=netns)
        self.result = self.error = None
        self.start()
        deadline = time.monotonic() + 5
        while not listening(netns, port) and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def run(self):
        try:
            self.result = capture_vxlan(*self.args, **self.options)
        except Exception as exc:  # handed to the test
            self.error = exc

    def finish(self, timeout=10):
        self.join(timeout)
        assert not self.is_alive(), "capture_vxlan did not end"
        if self.error:
            raise self.error
        return self.result


def test_kernel_vxlan_inner_frames_are_written_unchanged(link, tmp_path):
    sender, receiver = link
    path = tmp_path / "inner.pcapng"
    sent = frames(40, seed=1)
    capture = Capture(receiver, "vxlan://0.0.0.0", path, count=len(sent))
    out = socket_in(sender, socket.AF_PACKET, socket.SOCK_RAW)
    out.bind(("vtcvx0", 0))
    for frame in sent:
        out.send(frame)
    assert capture.finish() == len(sent)
    assert read_frames(path) == sent


def test_count_is_honoured(link, tmp_path):
    sender, receiver = link
    path = tmp_path / "count.pcapng"
    sent = frames(10, seed=2)
    capture = Capture(receiver, f"vxlan://{RECEIVER_IP}:4789", path, count=4)
    out = socket_in(sender, socket.AF_PACKET, socket.SOCK_RAW)
    out.bind(("vtcvx0", 0))
    for frame in sent:
        out.send(frame)
    assert capture.finish() == 4
    assert read_frames(path) == sent[:4]


def test_duration_is_honoured_without_traffic(netns, tmp_path):
    path = tmp_path / "quiet.pcapng"
    started = time.monotonic()
    assert capture_vxlan("vxlan://0.0.0.0:4790", str(path), duration=0.5, netns=netns) == 0
    assert 0.5 <= time.monotonic() - started < 2.0
    assert read_frames(path) == []


def test_vni_filter_ignores_other_vnis_and_packets_that_are_not_vxlan(link, tmp_path):
    sender, receiver = link
    wanted, other = frames(5, seed=3), frames(5, seed=4)
    udp = socket_in(sender, socket.AF_INET, socket.SOCK_DGRAM)

    def send_mix():
        for mine, theirs in zip(wanted, other):
            udp.sendto(vxlan_packet(43, theirs), (RECEIVER_IP, 4789))
            udp.sendto(vxlan_packet(42, mine, flags=0x00), (RECEIVER_IP, 4789))  # no I flag: not VXLAN
            udp.sendto(vxlan_packet(42, mine[:10]), (RECEIVER_IP, 4789))  # too short to hold a frame
            udp.sendto(vxlan_packet(42, mine), (RECEIVER_IP, 4789))

    filtered_path = tmp_path / "vni42.pcapng"
    capture = Capture(receiver, "vxlan://0.0.0.0?vni=42", filtered_path, count=len(wanted))
    send_mix()
    assert capture.finish() == len(wanted)
    assert read_frames(filtered_path) == wanted

    any_path = tmp_path / "any.pcapng"
    stop = threading.Event()
    capture = Capture(receiver, "vxlan://0.0.0.0", any_path, stop=stop)
    send_mix()
    time.sleep(0.5)
    stop.set()
    assert capture.finish() == 2 * len(wanted)
    assert read_frames(any_path) == [f for pair in zip(other, wanted) for f in pair]


@pytest.mark.parametrize(
    "listen, message",
    [
        ("udp://0.0.0.0", "^listen: "),
        ("vxlan://example.org", "^listen: "),
        ("vxlan://0.0.0.0:0", "^listen port: "),
        ("vxlan://0.0.0.0?vni=16777216", "^listen vni: "),
        ("vxlan://0.0.0.0?key=1", "^listen: "),
        ("vxlan://0.0.0.0?vni=5&vni=6", "^listen: .*'vni' is given twice"),
        ("vxlan://192.0.2.1", "^listen: 192.0.2.1 is not an address of this host"),
    ],
)
def test_bad_listen_urls_are_refused_and_write_no_file(link, tmp_path, listen, message):
    _, receiver = link
    path = tmp_path / "never.pcapng"
    with pytest.raises(ValidationError, match=message):
        capture_vxlan(listen, str(path), duration=0.1, netns=receiver)
    assert not path.exists()


def test_a_port_in_use_is_reported(link, tmp_path):
    sender, _ = link
    # The sender's kernel vxlan device holds UDP 4789 there.
    with pytest.raises(OperationFailed, match="UDP port 4789 .* already in use"):
        capture_vxlan("vxlan://0.0.0.0", str(tmp_path / "busy.pcapng"), duration=0.1, netns=sender)
    assert not (tmp_path / "busy.pcapng").exists()


@pytest.mark.parametrize("options, message", [({"count": 0}, "^count: "), ({"duration": -1}, "^duration: "), ({"count": "5"}, "^count: ")])
def test_bad_count_or_duration_is_refused_and_writes_no_file(netns, tmp_path, options, message):
    path = tmp_path / "never.pcapng"
    with pytest.raises(ValidationError, match=message):
        capture_vxlan("vxlan://0.0.0.0", str(path), netns=netns, **options)
    assert not path.exists()
