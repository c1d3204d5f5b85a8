"""VXLAN targets: copies reach HOST:PORT carrying the VNI, inner frames byte-identical.

    peer0 -- src0 (mirrored)          [test namespace, vtap works here]
             u0 10.77.0.1/24 ------- u1 10.77.0.2/24   [collector namespace: a plain UDP socket]

The collector decapsulates by hand (RFC 7348: 8-byte header, I flag, 24-bit VNI).
"""

import socket
import struct
import subprocess

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from datapaths import on_both_datapaths
from tc_lab import lab, new_marker  # noqa: F401 (lab: the fixture)
from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession

COLLECTOR = "10.77.0.2"


@pytest.fixture
def collector(lab):
    """A second namespace reachable over u0/u1; yields a function opening a UDP socket there."""
    from pyroute2 import netns as pr_netns

    name = f"{lab.netns}-c"
    pr_netns.create(name)
    sockets = []
    try:
        lab.standard()
        lab.ip("link", "add", "u0", "type", "veth", "peer", "name", "u1", "netns", name)
        lab.ip("addr", "add", "10.77.0.1/24", "dev", "u0")
        lab.ip("link", "set", "u0", "up")
        subprocess.run(["ip", "-n", name, "addr", "add", f"{COLLECTOR}/24", "dev", "u1"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "u1", "up"], check=True)
        # A static neighbour: no ARP on u0, so everything leaving u0 is tunnel traffic.
        mac = subprocess.run(["ip", "-n", name, "-br", "link", "show", "u1"], check=True, capture_output=True, text=True).stdout.split()[2]
        lab.ip("neigh", "replace", COLLECTOR, "lladdr", mac, "dev", "u0", "nud", "permanent")

        def listen(port):
            sock = pr_netns.create_socket(name, socket.AF_INET, socket.SOCK_DGRAM, 0, flags=0)
            sock.bind(("0.0.0.0", port))
            sockets.append(sock)
            return sock

        yield listen
    finally:
        for sock in sockets:
            sock.close()
        pr_netns.remove(name)


def datagrams(sock, marker):
    """The datagrams carrying `marker`: up to 2 s for the first, then until 0.5 s pass quietly."""
    out = []
    sock.settimeout(2.0)
    while True:
        try:
            data = sock.recv(65535)
        except socket.timeout:
            return out
        if marker in data:
            out.append(data)
            sock.settimeout(0.5)


def decapsulate(datagram):
    flags, vni_field = struct.unpack("!B3xI", datagram[:8])
    return flags, vni_field >> 8, datagram[8:]


@on_both_datapaths
def test_copies_reach_host_and_port_with_the_vni_inner_frames_identical(lab, collector):
    udp = collector(4789)
    driver = lab.driver()
    session = TapSession("tun", f"vxlan://{COLLECTOR}?vni=4242")
    flow = TapFlow("f", "tun", Source(interface="src0"), "in", "udp or vlan")
    reconcile.reconcile(driver, [session], [flow])
    marker = new_marker()
    sent = [
        bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=5, dport=6) / (marker + b"\x01" * 30)),
        # A full-size tagged frame: the copy plus VXLAN overhead is over the underlay's MTU (fragmented).
        bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=300) / IP() / TCP() / (marker + b"\x02" * 1448)),
        bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / TCP(dport=80) / (marker + b"\x03" * 30)),  # not matched
    ]
    lab.send("peer0", sent)
    got = [decapsulate(d) for d in datagrams(udp, marker)]
    assert [(flags, vni) for flags, vni, _ in got] == [(0x08, 4242)] * 2
    # The tag the kernel had moved into skb metadata is back in the inner frame.
    assert sorted(inner for _, _, inner in got) == sorted(sent[:2])


@on_both_datapaths
def test_a_custom_port_and_no_copies_of_the_tunnel_itself(lab, collector):
    """Mirroring the underlay device too must not copy the tunnel's own packets again (a loop)."""
    udp = collector(8472)
    driver = lab.driver()
    session = TapSession("tun", f"vxlan://{COLLECTOR}:8472?vni=7")
    flows = [TapFlow("f", "tun", Source(interface="src0"), "in"), TapFlow("g", "tun", Source(interface="u0"), "out")]
    reconcile.reconcile(driver, [session], flows)
    marker = new_marker()
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(40)))
    lab.send("peer0", [frame] * 5)
    got = [decapsulate(d) for d in datagrams(udp, marker)]
    assert [(vni, inner) for _, vni, inner in got] == [(7, frame)] * 5


def test_the_vxlan_device_is_vtaps_own_and_goes_with_the_session(lab, collector):
    driver = lab.driver()
    session = TapSession("tun", f"vxlan://{COLLECTOR}?vni=99")
    flow = TapFlow("f", "tun", Source(interface="src0"), "both")
    reconcile.reconcile(driver, [session], [flow])
    shown = lab.ip("-d", "link", "show", "type", "vxlan").stdout
    assert "vxlan id 99 remote 10.77.0.2" in shown and "dstport 4789" in shown and "alias vtap:" in shown
    assert "inet6" not in lab.ip("addr", "show", "type", "vxlan").stdout  # sends nothing of its own
    assert reconcile.reconcile(driver, [session], [flow]).empty
    # Someone changes the device behind vtap's back: the next reconcile puts it right.
    name = shown.split(":")[1].strip().split("@")[0]
    lab.ip("link", "set", name, "down")
    assert len(reconcile.reconcile(driver, [session], [flow]).add) == 1
    assert "state UNKNOWN" in lab.ip("link", "show", name).stdout or ",UP" in lab.ip("link", "show", name).stdout
    # Down when its session goes: removed all the same (observe once skipped a down device, and it stayed).
    lab.ip("link", "set", name, "down")
    reconcile.reconcile(driver, [], [])
    assert lab.ip("link", "show", "type", "vxlan").stdout == ""
    assert driver.observe() == []


def test_hostnames_are_resolved_at_plan_time(lab, collector):
    driver = lab.driver()
    (binding,) = driver.plan([TapSession("tun", "vxlan://localhost?vni=1")], [])
    assert binding.get("remote") in ("127.0.0.1", "::1")


@on_both_datapaths
def test_a_port_taken_on_this_host_fails_clearly_and_leaves_nothing(lab):
    from pyroute2 import netns as pr_netns

    from vtap_core.errors import OperationFailed

    lab.standard()
    taken = pr_netns.create_socket(lab.netns, socket.AF_INET, socket.SOCK_DGRAM, 0, flags=0)
    try:
        taken.bind(("0.0.0.0", 4789))
        driver = lab.driver()
        session = TapSession("tun", f"vxlan://{COLLECTOR}?vni=5")
        with pytest.raises(OperationFailed, match="UDP port is in use on this host"):
            driver.apply(driver.plan([session], [TapFlow("f", "tun", Source(interface="src0"), "in")]))
    finally:
        taken.close()
    assert lab.ip("link", "show", "type", "vxlan").stdout == ""
    assert lab.mirrors("src0", "ingress") == 0
    assert driver.observe() == []
