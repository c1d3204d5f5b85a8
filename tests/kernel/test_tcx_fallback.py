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
