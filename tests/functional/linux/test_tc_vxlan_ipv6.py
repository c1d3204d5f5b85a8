"""VXLAN targets over an IPv6 underlay, with local= (this kernel has vxlan; gretap/erspan are in tests/kernel/).

    peer0 -- src0 (mirrored)     [test namespace]
             u0 fd77::1/64 ------- u1 fd77::2/64   [collector namespace: a plain UDP socket]
"""

import socket
import struct
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tc_lab import lab, new_marker  # noqa: F401 (lab: the fixture)
from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession


@pytest.fixture
def collector6(lab):
    from pyroute2 import netns as pr_netns

    name = f"{lab.netns}-c"
    pr_netns.create(name)
    sock = None
    try:
        lab.standard()
        lab.ip("link", "add", "u0", "type", "veth", "peer", "name", "u1", "netns", name)
        # The lab turns IPv6 off in its namespace (so veths send nothing of their own): back on for the underlay.
        subprocess.run(["ip", "netns", "exec", lab.netns, "sysctl", "-qw", "net.ipv6.conf.u0.disable_ipv6=0"], check=True)
        lab.ip("addr", "add", "fd77::1/64", "dev", "u0", "nodad")
        lab.ip("link", "set", "u0", "up")
        subprocess.run(["ip", "-n", name, "addr", "add", "fd77::2/64", "dev", "u1", "nodad"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "u1", "up"], check=True)
        mac = subprocess.run(["ip", "-n", name, "-br", "link", "show", "u1"], check=True, capture_output=True, text=True).stdout.split()[2]
        lab.ip("-6", "neigh", "replace", "fd77::2", "lladdr", mac, "dev", "u0", "nud", "permanent")
        sock = pr_netns.create_socket(name, socket.AF_INET6, socket.SOCK_DGRAM, 0, flags=0)
        sock.bind(("::", 4789))
        yield sock
    finally:
        if sock is not None:
            sock.close()
        pr_netns.remove(name)


def test_ipv6_underlay_with_a_local_address(lab, collector6):
    driver = lab.driver()
    session = TapSession("tun6", "vxlan://[fd77::2]?vni=66&local=fd77::1")
    flow = TapFlow("f", "tun6", Source(interface="src0"), "in")
    reconcile.reconcile(driver, [session], [flow])
    assert reconcile.reconcile(driver, [session], [flow]).empty  # the local address reads back as planned
    shown = lab.ip("-d", "link", "show", "type", "vxlan").stdout
    assert "vxlan id 66 remote fd77::2 local fd77::1" in shown
    marker = new_marker()
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(40)))
    lab.send("peer0", [frame] * 3)
    got = []
    collector6.settimeout(2.0)
    try:
        while len(got) < 3:
            data, sender = collector6.recvfrom(65535)
            if marker in data:
                got.append((sender[0], struct.unpack("!I", data[4:8])[0] >> 8, data[8:]))
    except socket.timeout:
        pass
    assert got == [("fd77::1", 66, frame)] * 3
    reconcile.reconcile(driver, [], [])
    assert lab.ip("link", "show", "type", "vxlan").stdout == ""
