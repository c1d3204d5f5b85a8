"""GRE and ERSPAN targets on the tc data path, on Debian's kernel (gretap, ip6gretap, erspan, ip6erspan).

    peer0 -- src0 (mirrored, "in", filter "udp")         [host namespace: vtap works here]
             u0 10.78.0.1/24 fd78::1/64 ---- u1 10.78.0.2/24 fd78::2/64   [collector namespace]

Frames arriving on u1 are captured (AF_PACKET), written to a pcap file and
dissected by tshark: GRE/ERSPAN with the right key / session id, and the inner
frame byte-identical to what was sent on peer0 (decap.py and tshark agree).
u0 is mirrored too ("out", no filter): the tunnel's own packets must not be
copied into the tunnel again.
"""

import os
import socket
import struct
import subprocess
import time
import uuid

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux.decap import decap_gre

from .lane import lane_only

pytestmark = lane_only
ETH_P_ALL = 0x0003


def ip(netns, *args):
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def lab(netns, tmp_path):
    from pyroute2 import netns as pr_netns

    collector = f"{netns}-c"
    pr_netns.create(collector)
    drivers = []
    try:
        for a, b in (("src0", "peer0"),):
            ip(netns, "link", "add", a, "type", "veth", "peer", "name", b)
        ip(netns, "link", "add", "u0", "type", "veth", "peer", "name", "u1", "netns", collector)
        for ns, dev, v4, v6 in ((netns, "u0", "10.78.0.1", "fd78::1"), (collector, "u1", "10.78.0.2", "fd78::2")):
            ip(ns, "addr", "add", f"{v4}/24", "dev", dev)
            ip(ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        for dev in ("src0", "peer0"):
            ip(netns, "link", "set", dev, "addrgenmode", "none")
        for ns, dev in ((netns, "src0"), (netns, "peer0"), (netns, "u0"), (collector, "u1"), (netns, "lo"), (collector, "lo")):
            ip(ns, "link", "set", dev, "up")
        mac = ip(collector, "-br", "link", "show", "u1").split()[2]
        ip(netns, "neigh", "replace", "10.78.0.2", "lladdr", mac, "dev", "u0", "nud", "permanent")
        ip(netns, "-6", "neigh", "replace", "fd78::2", "lladdr", mac, "dev", "u0", "nud", "permanent")

        class Lab:
            host, peer = netns, collector

            def driver(self):
                from vtap_drivers.linux.driver import LinuxDriver

                driver = LinuxDriver(state_dir=str(tmp_path), netns=netns)
                drivers.append(driver)
                return driver

            def open_capture(self):
                sock = pr_netns.create_socket(collector, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL), flags=0)
                sock.bind(("u1", 0))
                return sock

            def send(self, frames):
                sock = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
                try:
                    sock.bind(("peer0", 0))
                    for frame in frames:
                        sock.send(frame)
                finally:
                    sock.close()

        yield Lab()
    finally:
        for driver in drivers:
            driver.close()
        pr_netns.remove(collector)


def received(sock, marker, first=3.0, quiet=1.0):
    """Outer frames carrying the marker: up to `first` s for the first one, then until `quiet` s pass."""
    out = []
    sock.settimeout(first)
    while True:
        try:
            data, address = sock.recvfrom(65535)
        except socket.timeout:
            return out
        # Only what arrives: u1 answers GRE it has no tunnel for with ICMP errors quoting it.
        if marker in data and address[2] != socket.PACKET_OUTGOING:
            out.append(data)
            sock.settimeout(quiet)


def ip_payload(frame):
    """(IP protocol, payload) of an outer Ethernet + IPv4/IPv6 frame."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        return frame[23], frame[14 + ihl :]
    assert ethertype == 0x86DD
    return frame[20], frame[54:]


def dissect(tmp_path, frames, fields):
    """tshark's reading of the frames (a classic pcap file written here): one list of field values per frame."""
    path = tmp_path / "outer.pcap"
    with open(path, "wb") as out:
        out.write(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for frame in frames:
            out.write(struct.pack("=IIII", 0, 0, len(frame), len(frame)) + frame)
    args = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for field in fields:
        args += ["-e", field]
    result = subprocess.run(args, check=True, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    return [line.split("|") for line in result.stdout.splitlines()]


CASES = [
    # target, tshark fields, expected values, what decap says
    ("gre://10.78.0.2?key=7", ["frame.protocols", "gre.key"], ["eth:ethertype:ip:gre:eth:ethertype:ip:udp:data", "0x00000007"], dict(tunnel="gre", key=7)),
    ("gre://[fd78::2]?local=fd78::1", ["frame.protocols", "ipv6.src"], ["eth:ethertype:ipv6:gre:eth:ethertype:ip:udp:data", "fd78::1"], dict(tunnel="gre", key=None)),
    ("erspan://10.78.0.2?version=2&id=5", ["frame.protocols", "erspan.version", "erspan.spanid"], ["eth:ethertype:ip:gre:erspan:eth:ethertype:ip:udp:data", "1", "5"], dict(tunnel="erspan", erspan_version=2, session_id=5)),
    ("erspan://10.78.0.2?version=3&id=1023&local=10.78.0.1", ["frame.protocols", "erspan.version", "erspan.spanid"], ["eth:ethertype:ip:gre:erspan:eth:ethertype:ip:udp:data", "2", "1023"], dict(tunnel="erspan", erspan_version=3, session_id=1023)),
    ("erspan://[fd78::2]?version=2&id=9&local=fd78::1", ["frame.protocols", "erspan.spanid"], ["eth:ethertype:ipv6:gre:erspan:eth:ethertype:ip:udp:data", "9"], dict(tunnel="erspan", erspan_version=2, session_id=9)),
]


@pytest.mark.parametrize("target, fields, expected, meta", CASES, ids=[c[0] for c in CASES])
def test_copies_arrive_dissected_with_their_session_and_inner_frames_identical(lab, tmp_path, target, fields, expected, meta):
    driver = lab.driver()
    session = TapSession("tun", target)
    # src0 "in" filtered; u0 "out" unfiltered: the tunnel's own packets leave through u0 and must not loop.
    flows = [TapFlow("f", "tun", Source(interface="src0"), "in", "udp"), TapFlow("g", "tun", Source(interface="u0"), "out")]
    reconcile.reconcile(driver, [session], flows)
    assert reconcile.reconcile(driver, [session], flows).empty  # idempotent: observe() reads back what plan() made
    capture = lab.open_capture()
    try:
        marker = uuid.uuid4().hex.encode()
        sent = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=5, dport=6) / (marker + bytes([n]) * 40)) for n in range(3)]
        not_matched = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / TCP(dport=80) / (marker + b"\xff" * 30))
        lab.send(sent + [not_matched])
        outer = received(capture, marker)
    finally:
        capture.close()
    assert len(outer) == 3, f"{len(outer)} copies arrived, 3 expected (a loop or a leak of the unmatched frame otherwise)"
    assert [row for row in dissect(tmp_path, outer, fields)] == [expected] * 3
    inner = []
    for frame in outer:
        proto, payload = ip_payload(frame)
        assert proto == 47
        frame_inside, found = decap_gre(payload)
        assert {name: getattr(found, name) for name in meta} == meta
        inner.append(frame_inside)
    assert inner == sent
    reconcile.reconcile(driver, [], [])
    assert "vtapg" not in ip(lab.host, "link", "show")
    assert driver.observe() == []


def test_a_changed_device_is_repaired_and_goes_with_the_session(lab):
    driver = lab.driver()
    session = TapSession("tun", "erspan://10.78.0.2?version=2&id=5")
    flows = [TapFlow("f", "tun", Source(interface="src0"), "in")]
    reconcile.reconcile(driver, [session], flows)
    shown = ip(lab.host, "-d", "link", "show", "type", "erspan")
    assert "alias vtap:" in shown and "erspan_ver 1" in shown and "remote 10.78.0.2" in shown
    (name,) = [word.split("@")[0] for word in shown.split() if word.startswith("vtapg")]
    # Drift: someone points the device elsewhere; the next reconcile replaces it.
    ip(lab.host, "link", "set", name, "type", "erspan", "remote", "10.78.0.9", "seq", "key", "5", "erspan_ver", "1", "erspan", "1")
    assert not reconcile.reconcile(driver, [session], flows).empty
    reconcile.reconcile(driver, [session], flows)  # the device was replaced: the mirror follows it in the next pass
    assert "remote 10.78.0.2" in ip(lab.host, "-d", "link", "show", name)
    assert reconcile.reconcile(driver, [session], flows).empty
    reconcile.reconcile(driver, [], [])
    assert "vtapg" not in ip(lab.host, "link", "show")  # (erspan0 is the kernel's own fallback device)
    assert driver.observe() == []


def test_gre_on_this_kernel_is_planned_not_refused(lab):
    """The refusal of gre:/erspan: targets is only for kernels without the device types."""
    from vtap_drivers.linux.dataplane import missing_tunnel_device
    from vtap_core.model import Target

    for text in ("gre://10.78.0.2", "gre://[fd78::2]?local=fd78::1", "erspan://10.78.0.2?id=1", "erspan://[fd78::2]?version=3&id=1&local=fd78::1"):
        assert missing_tunnel_device(Target.parse(text)) is None


@pytest.mark.parametrize("target, listen", [("erspan://10.78.0.2?version=3&id=9", "erspan://10.78.0.2?id=9"), ("gre://10.78.0.2?key=3", "gre://0.0.0.0?key=3")])
def test_vtap_capture_terminates_what_the_kernel_sends(lab, tmp_path, target, listen):
    """End to end: a vtap tunnel target into `vtap capture --listen` on the collector; the frames come out unchanged."""
    import sys

    from scapy.utils import rdpcap

    driver = lab.driver()
    reconcile.reconcile(driver, [TapSession("tun", target)], [TapFlow("f", "tun", Source(interface="src0"), "in")])
    path = tmp_path / "end.pcapng"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}
    process = subprocess.Popen(["ip", "netns", "exec", lab.peer, "vtap", "capture", "--listen", listen, "-w", str(path), "--count", "3"], env=env, stderr=subprocess.PIPE, text=True)
    marker = uuid.uuid4().hex.encode()
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(50)))
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        lab.send([frame])
        time.sleep(0.3)
    if process.poll() is None:
        process.kill()
    assert process.wait() == 0, process.stderr.read()
    assert [bytes(p) for p in rdpcap(str(path))] == [frame] * 3
    reconcile.reconcile(driver, [], [])


def test_erspan_type_iii_says_the_direction_of_each_copy(lab, tmp_path):
    """Type III's D bit: ingress for what src0 received, egress for what it sent (the device's point of view)."""
    from pyroute2 import netns as pr_netns

    driver = lab.driver()
    session = TapSession("dir", "erspan://10.78.0.2?version=3&id=77")
    flows = [TapFlow("f", "dir", Source(interface="src0"), "both", "udp")]
    reconcile.reconcile(driver, [session], flows)
    assert reconcile.reconcile(driver, [session], flows).empty
    capture = lab.open_capture()
    try:
        marker = uuid.uuid4().hex.encode()
        received_by_src0 = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP(dport=1) / (marker + b"\x01" * 20))
        sent_by_src0 = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP() / UDP(dport=2) / (marker + b"\x02" * 20))
        lab.send([received_by_src0] * 2)
        out = pr_netns.create_socket(lab.host, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
        out.bind(("src0", 0))
        out.send(sent_by_src0)
        out.close()
        outer = received(capture, marker)
    finally:
        capture.close()
    seen = sorted((decap_gre(ip_payload(f)[1])[1].direction, decap_gre(ip_payload(f)[1])[0]) for f in outer)
    assert seen == sorted([("ingress", received_by_src0)] * 2 + [("egress", sent_by_src0)])
    bits = {"0": 0, "False": 0, "1": 1, "True": 1}
    assert sorted(bits[row[0]] for row in dissect(tmp_path, outer, ["erspan.direction"])) == [0, 0, 1]
    reconcile.reconcile(driver, [], [])
    assert "vtapg" not in ip(lab.host, "link", "show")


KILLED_APPLY = """
import os, signal, sys
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux.driver import LinuxDriver
driver = LinuxDriver(state_dir=sys.argv[1], netns=sys.argv[2])
session = TapSession("web", sys.argv[3])
driver.apply(driver.plan([session], [TapFlow("f1", "web", Source(interface="src0"), "both", "udp")]))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("lose_state_dir", [False, True])
def test_orphans_of_a_killed_process_are_found_and_removed(lab, tmp_path, lose_state_dir):
    import shutil
    import signal
    import sys

    state = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILLED_APPLY, str(state), lab.host, "erspan://10.78.0.2?version=3&id=4"], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert ip(lab.host, "link", "show").count("vtapg") == 2  # type III: one device per direction
    if lose_state_dir:
        shutil.rmtree(state)
    from vtap_drivers.linux.driver import LinuxDriver

    driver = LinuxDriver(state_dir=str(state), netns=lab.host)
    try:
        orphans = driver.observe()
        assert len(orphans) == 4  # two mirrors, two devices
        assert all(b.key.startswith("unknown/") for b in orphans) == lose_state_dir
        reconcile.reconcile(driver, [], [])
        assert driver.observe() == []
    finally:
        driver.close()
    assert "vtapg" not in ip(lab.host, "link", "show")
    assert "filter" not in subprocess.run(["tc", "-n", lab.host, "filter", "show", "dev", "src0", "ingress"], capture_output=True, text=True).stdout
