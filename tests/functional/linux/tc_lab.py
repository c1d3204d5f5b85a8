"""Helpers of the tc tests: a small lab in the test's own namespace: veth pairs, a sender, a counter on the target side.

    peer0 ---- src0          the mirrored interface (frames sent on peer0 arrive at src0: its "in";
                             frames sent on src0 leave it: its "out")
    mon0  ---- mon1          a port: target; copies are transmitted on mon0 and counted on mon1

Every frame a test sends carries a marker in its payload, so only the test's
own frames are counted. veths get no IPv6 address, so they send nothing of their own.

Test modules import the `lab` fixture from here (`from tc_lab import lab`): this
folder has no conftest.py, since tests elsewhere do `from conftest import ...`
and a second conftest module would shadow theirs.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
import uuid

import pytest

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 1 << 4
AUXDATA = struct.Struct("IIIHHHH")
FIRST = 2.0  # seconds to wait for the first copy
QUIET = 0.25  # seconds without a frame after that: everything that was coming has come
LONGEST = 10.0  # seconds, whatever else the device sees


class Lab:
    def __init__(self, netns: str, state_dir: str, datapath: str = "tc"):
        self.netns = netns
        self.state_dir = state_dir
        self.datapath = datapath  # the data path driver() and dataplane() use (conftest.on_both_datapaths)
        self._drivers = []

    # ---------------------------------------------------------------- setup (CLI tools: tests may)

    def ip(self, *args, check=True):
        return subprocess.run(["ip", "-n", self.netns, *args], check=check, capture_output=True, text=True)

    def tc(self, *args, check=True):
        return subprocess.run(["tc", "-n", self.netns, *args], check=check, capture_output=True, text=True)

    def veth(self, a: str, b: str) -> None:
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        for end in (a, b):
            self.ip("link", "set", end, "addrgenmode", "none")
            self.ip("link", "set", end, "up")

    def standard(self) -> "Lab":
        self.veth("src0", "peer0")
        self.veth("mon0", "mon1")
        return self

    def driver(self, **settings):
        from vtap_drivers.linux.driver import LinuxDriver

        settings.setdefault("datapath", self.datapath)
        driver = LinuxDriver(state_dir=self.state_dir, netns=self.netns, **settings)
        self._drivers.append(driver)
        return driver

    def dataplane(self):
        from vtap_drivers.linux.dataplane import TcDataplane

        dataplane = TcDataplane(netns=self.netns, state_dir=self.state_dir, datapath=self.datapath)
        self._drivers.append(dataplane)
        return dataplane

    def close(self):
        for driver in self._drivers:
            driver.close()

    # ---------------------------------------------------------------- kernel read-back

    def filter_handles(self, device: str, hook: str) -> list[str]:
        """One line per filter (not per priority header) on a device's hook, as tc shows them."""
        out = self.tc("filter", "show", "dev", device, hook, check=False).stdout
        return [line for line in out.splitlines() if line.startswith("filter") and " handle " in line]

    def mirrors(self, device: str, hook: str) -> int:
        """How many mirrors are on a device's hook: tc filters, or programs on the tcx hook."""
        if self.datapath == "tc":
            return len(self.filter_handles(device, hook))
        from vtap_drivers.linux import bpfsys, tcxmirror

        with tcxmirror.in_netns(self.netns):
            return len(bpfsys.query_tcx(socket.if_nametoindex(device), hook).prog_ids)

    def qdiscs(self, device: str) -> str:
        return self.tc("qdisc", "show", "dev", device).stdout

    # ---------------------------------------------------------------- frames

    def packet_socket(self, device: str) -> socket.socket:
        from pyroute2 import netns as pr_netns

        sock = pr_netns.create_socket(self.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL), flags=0)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((device, ETH_P_ALL))
        return sock

    def send(self, device: str, frames) -> None:
        sock = self.packet_socket(device)
        try:
            for frame in frames:
                sock.send(frame)
        finally:
            sock.close()


def receive(sock: socket.socket, marker: bytes, first: float = FIRST, quiet: float = QUIET) -> list[bytes]:
    """Frames received (not sent) on the socket's device that carry `marker`, VLAN tag put back.

    Waits up to `first` seconds for the first frame (a busy machine delays
    softirqs), then until nothing more comes for `quiet` seconds.
    """
    out = []
    wait = first
    deadline = time.monotonic() + LONGEST
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            return out
        data, ancdata, _flags, address = sock.recvmsg(65535, socket.CMSG_SPACE(AUXDATA.size))
        if address[2] == socket.PACKET_OUTGOING or marker not in data:
            continue
        wait = quiet
        for level, kind, aux in ancdata:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack(aux[: AUXDATA.size])
                if status & TP_STATUS_VLAN_VALID:
                    data = data[:12] + struct.pack("!HH", tpid or 0x8100, tci) + data[12:]
        out.append(data)
    return out


def new_marker() -> bytes:
    return b"VTAPT" + uuid.uuid4().bytes[:7]


@pytest.fixture
def lab(netns, tmp_path, datapath, monkeypatch):
    monkeypatch.setenv("VTAP_DATAPATH", datapath)  # for the vtap commands and child processes a test runs
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    lab = Lab(netns, str(tmp_path / "state"), datapath)
    lab.ip("link", "set", "lo", "up")
    if datapath == "tcx":
        from vtap_drivers.linux import bpfsys

        if not bpfsys.tcx_supported():
            pytest.skip(f"this kernel ({os.uname().release}) has no tcx hook")
    try:
        yield lab
    finally:
        lab.close()
        if datapath == "tcx":
            from datapaths import remove_pins

            remove_pins(netns)

