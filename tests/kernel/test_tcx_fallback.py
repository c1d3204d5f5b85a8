"""On a kernel without tcx (Debian 12's 6.1), attaching says so distinctly, and the program itself still loads.

A caller falls back to clsact on TcxUnsupported; the translated program is a
plain SCHED_CLS program, so it runs on such a kernel too (as TEST_RUN shows).
"""

import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vtap_core import filters
from vtap_drivers.linux import bpfsys, tcxprog

from .lane import lane_only

pytestmark = lane_only

NO_SUCH_IFINDEX = 0x7FFFFFF0


def test_tcx_attach_reports_a_kernel_without_tcx():
    assert not bpfsys.tcx_supported()
    with tcxprog.load_mirror(filters.compile_filter("udp port 9"), NO_SUCH_IFINDEX, "old") as mirror:
        with pytest.raises(bpfsys.TcxUnsupported, match="no tcx hook"):
            bpfsys.attach_tcx(mirror.prog, socket.if_nametoindex("lo"), "ingress")
        frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(dport=9))
        assert bpfsys.run_on_frame(mirror.prog, frame).retval == tcxprog.TCX_NEXT
        assert mirror.read_counters() == {"packets": 1, "bytes": len(frame), "clone_failures": 1}


def test_datapath_tcx_falls_back_to_clsact_and_copies_still_arrive(netns, tmp_path):
    """vtap asked for tcx on this kernel: the mirror goes on clsact + cls_bpf, no pin, copies arrive."""
    import os
    import select
    import subprocess

    from pyroute2 import netns as pr_netns

    from vtap_core import reconcile
    from vtap_core.model import Source, TapFlow, TapSession
    from vtap_drivers.linux import tcxmirror
    from vtap_drivers.linux.driver import LinuxDriver

    def ip(*args):
        subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)

    for a, b in (("src0", "peer0"), ("mon0", "mon1")):
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        for end in (a, b):
            ip("link", "set", end, "up")
    driver = LinuxDriver(state_dir=str(tmp_path / "state"), netns=netns, datapath="tcx")
    listen = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3), flags=0)
    send = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3), flags=0)
    try:
        flow = TapFlow("f", "s", Source(interface="src0"), "in", "udp port 9")
        reconcile.reconcile(driver, [TapSession("s", "port:mon0")], [flow])
        (mirror,) = driver.observe()
        assert mirror.get("datapath") is None  # planned as datapath=tc plans it
        shown = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", "src0", "ingress"], capture_output=True, text=True).stdout
        assert " bpf " in shown and "mirred" in shown
        assert not os.path.isdir(tcxmirror.pin_dir(netns)) or os.listdir(tcxmirror.pin_dir(netns)) == []
        listen.bind(("mon1", 3))
        send.bind(("peer0", 3))
        marker = b"VTAPLANE" + os.urandom(4)
        for dport in (9, 9, 9, 10):
            send.send(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(dport=dport) / marker))
        copies = 0
        while select.select([listen], [], [], 2.0)[0]:
            data, address = listen.recvfrom(65535)
            if marker in data and address[2] != socket.PACKET_OUTGOING:
                copies += 1
        assert copies == 3
        assert driver.observe()[0].counters.packets == 3
    finally:
        listen.close()
        send.close()
        driver.close()
