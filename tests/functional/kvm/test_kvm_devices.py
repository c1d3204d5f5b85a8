"""Device types of libvirt NICs, on real kernel devices: a macvtap (type='direct') NIC and passthrough NICs.

libvirt here is its own `test:///FILE` driver (no libvirtd, no guest): it reports the domain XML
we write, naming a real macvtap device this test builds on a veth "physical" NIC. The test plays
the guest through the macvtap's character device: writing to it is what the VM sends, reading
from it is what the VM receives. Copies are counted on the far end of veth port targets.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from vtap_core.client import Client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates macvtap devices and tc filters")
libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")

SRC_UUID = "6d1f5c1e-0000-4000-8000-0000000000a1"
MON_UUID = "6d1f5c1e-0000-4000-8000-0000000000a2"
GUEST_MAC = "52:54:00:7a:00:01"
MON_MAC = "52:54:00:7a:00:02"
PASSTHROUGH_MAC = "52:54:00:7a:00:03"
TUNGETIFF = 0x800454D2
IFF_VNET_HDR = 0x4000
VNET_HDR = b"\0" * 10  # struct virtio_net_hdr, all zero: a plain frame
ETH_P_ALL = 0x0003


def ip(*args):
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def domain(name, uuid_, nics):
    return f"<domain type='test'><name>{name}</name><uuid>{uuid_}</uuid><memory>65536</memory><os><type>hvm</type></os><devices>{nics}</devices></domain>"


def direct_nic(mac, lower, device, via_network=False):
    if via_network:  # a libvirt network in macvtap mode (forward mode='bridge'): the XML says network, the kernel macvtap
        return f"<interface type='network'><mac address='{mac}'/><source network='direct-net'/><target dev='{device}'/></interface>"
    return f"<interface type='direct'><mac address='{mac}'/><source dev='{lower}' mode='bridge'/><target dev='{device}'/></interface>"


def hostdev_nic(mac):
    return f"<interface type='hostdev'><mac address='{mac}'/><source><address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x1'/></source></interface>"


class MacvtapLab:
    """Root-namespace devices with names of their own: wire-phys (veth), macvtaps on phys, two port targets."""

    def __init__(self, tmp_path):
        tag = uuid.uuid4().hex[:5]
        self.tmp = tmp_path
        self.phys, self.wire = f"vtq{tag}p", f"vtq{tag}w"
        self.guest, self.mon_nic = f"vtq{tag}m", f"vtq{tag}n"
        self.targets = {name: (f"vtq{tag}{name}", f"vtq{tag}{name.upper()}") for name in ("a", "b")}
        self.made = []
        self._veth(self.phys, self.wire)
        for end, peer in self.targets.values():
            self._veth(end, peer)
        for device, mac in ((self.guest, GUEST_MAC), (self.mon_nic, MON_MAC)):
            ip("link", "add", "link", self.phys, "name", device, "address", mac, "type", "macvtap", "mode", "bridge")
            self.made.append(device)
            ip("link", "set", device, "addrgenmode", "none")
            ip("link", "set", device, "up")
        self.node = tmp_path / "node.xml"
        self.write_domains(extra_nic="")

    def _veth(self, a, b):
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        self.made.append(a)
        for end in (a, b):
            ip("link", "set", end, "addrgenmode", "none")
            ip("link", "set", end, "up")

    def write_domains(self, extra_nic: str, via_network: bool = False) -> None:
        src = domain("src", SRC_UUID, direct_nic(GUEST_MAC, self.phys, self.guest, via_network) + extra_nic)
        mon = domain("mon", MON_UUID, direct_nic(MON_MAC, self.phys, self.mon_nic))
        self.node.write_text(f"<node>{src}{mon}</node>")

    @property
    def uri(self) -> str:
        return f"test://{self.node}"

    def open_guest(self) -> int:
        """The macvtap's character device, as QEMU would open it: the guest's side of the NIC."""
        index = int(open(f"/sys/class/net/{self.guest}/ifindex").read())
        major, minor = map(int, open(f"/sys/class/net/{self.guest}/macvtap/tap{index}/dev").read().split(":"))
        path = self.tmp / "guest-tap"
        os.mknod(path, 0o600 | 0o020000, os.makedev(major, minor))
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        flags = struct.unpack("16sH", fcntl.ioctl(fd, TUNGETIFF, b"\0" * 18))[1]
        self.vnet_hdr = VNET_HDR if flags & IFF_VNET_HDR else b""
        return fd

    def close(self):
        for device in self.made:
            subprocess.run(["ip", "link", "del", device], capture_output=True)


@pytest.fixture
def mlab(tmp_path):
    lab = MacvtapLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def frame(dst: str, src: str, marker: bytes) -> bytes:
    return bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb5" + marker + b"x" * 60


def listen(device: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((device, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def count(sock: socket.socket, marker: bytes) -> int:
    time.sleep(0.5)
    n = 0
    while True:
        try:
            data, address = sock.recvfrom(65535)
        except BlockingIOError:
            return n
        if address[2] != socket.PACKET_OUTGOING and marker in data:
            n += 1


def drain(fd: int, marker: bytes) -> int:
    n = 0
    while True:
        try:
            data = os.read(fd, 65535)
        except BlockingIOError:
            return n
        n += marker in data


@pytest.mark.parametrize("via_network", [False, True], ids=["type-direct", "type-network"])
def test_macvtap_nic_out_is_what_the_guest_writes_and_in_what_it_reads(mlab, tmp_path, via_network):
    mlab.write_domains(extra_nic="", via_network=via_network)
    guest = mlab.open_guest()
    (to_sent, count_sent), (to_received, count_received) = mlab.targets["a"], mlab.targets["b"]
    sent_copies, received_copies = listen(count_sent), listen(count_received)
    with Client(driver="kvm", state=str(tmp_path / "vtap.db"), uri=mlab.uri) as vtap:
        vtap.create_session("sent", to=f"port:{to_sent}")
        vtap.add_flow("sent", vm="src", nic=GUEST_MAC, direction="out", name="sent-1")
        vtap.create_session("received", to=f"port:{to_received}")
        vtap.add_flow("received", vm=SRC_UUID, direction="in", name="received-1")
        marker_out, marker_in = b"VTQOUT" + os.urandom(4), b"VTQIN" + os.urandom(4)
        for _ in range(5):  # the guest sends 5 frames
            os.write(guest, mlab.vnet_hdr + frame("ff:ff:ff:ff:ff:ff", GUEST_MAC, marker_out))
        wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        wire.bind((mlab.wire, 0))
        for _ in range(3):  # the network sends 3 frames to the guest
            wire.send(frame(GUEST_MAC, "02:00:00:00:00:09", marker_in))
        wire.close()
        assert drain(guest, marker_in) == 3  # the guest really received them
        assert (count(sent_copies, marker_out), count(sent_copies, marker_in)) == (5, 0)
        assert (count(received_copies, marker_in), count(received_copies, marker_out)) == (3, 0)
        rows = {row.flow: row for row in vtap.status()}
        assert (rows["sent-1"].state, rows["sent-1"].packets) == ("active", 5)
        assert (rows["received-1"].state, rows["received-1"].packets) == ("active", 3)
        vtap.delete_session("sent")
        vtap.delete_session("received")
    os.close(guest)


def run_vtap(mlab, state, *args):
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    return subprocess.run(["vtap", "--driver", "kvm", "--uri", mlab.uri, "--state", state, *args], capture_output=True, text=True, env=env)


def tc_on(device: str) -> list[str]:
    """The filters on a device's hooks: handles and cookies (tc adds display-only lines after the first dump)."""
    out = "".join(subprocess.run(["tc", "filter", "show", "dev", device, hook], capture_output=True, text=True).stdout for hook in ("ingress", "egress"))
    return [line.strip() for line in out.splitlines() if " handle " in line or "cookie" in line]


def test_a_macvtap_nic_is_refused_as_vm_target_and_nothing_changes(mlab, tmp_path):
    state = str(tmp_path / "vtap.db")
    to_port, _ = mlab.targets["a"]
    assert run_vtap(mlab, state, "session", "create", "s", "--to", f"port:{to_port}").returncode == 0
    assert run_vtap(mlab, state, "flow", "add", "s", "--vm", "src", "--direction", "out").returncode == 0
    before = (run_vtap(mlab, state, "session", "list", "-o", "json").stdout, tc_on(mlab.guest), tc_on(mlab.mon_nic))
    # Mirrored to the monitoring VM's macvtap, copies would leave by the physical NIC (checked by hand: the
    # wire got them all, the guest none), so a vm: target on a macvtap NIC is refused.
    result = run_vtap(mlab, state, "session", "create", "mon", "--to", f"vm:{MON_UUID}")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "macvtap" in result.stderr and "physical NIC" in result.stderr
    assert (run_vtap(mlab, state, "session", "list", "-o", "json").stdout, tc_on(mlab.guest), tc_on(mlab.mon_nic)) == before
    assert run_vtap(mlab, state, "session", "delete", "s").returncode == 0


def test_passthrough_nic_is_refused_at_flow_add_and_a_problem_in_status(mlab, tmp_path):
    import json

    state = str(tmp_path / "vtap.db")
    to_port, _ = mlab.targets["a"]
    assert run_vtap(mlab, state, "session", "create", "s", "--to", f"port:{to_port}").returncode == 0
    assert run_vtap(mlab, state, "flow", "add", "s", "--vm", "src", "--direction", "out", "--name", "whole").returncode == 0
    mlab.write_domains(extra_nic=hostdev_nic(PASSTHROUGH_MAC))  # the VM now also has a passthrough NIC
    before = (run_vtap(mlab, state, "flow", "list", "-o", "json").stdout, tc_on(mlab.guest))
    for nic in (["--nic", PASSTHROUGH_MAC], []):
        result = run_vtap(mlab, state, "flow", "add", "s", "--vm", "src", *nic, "--direction", "in")
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and "NIC passthrough: no host-side device" in result.stderr
        assert (run_vtap(mlab, state, "flow", "list", "-o", "json").stdout, tc_on(mlab.guest)) == before
    status = json.loads(run_vtap(mlab, state, "status", "-o", "json").stdout)
    rows = {row["flow"]: row for row in status if row["state"] != "orphan"}
    assert "NIC passthrough: no host-side device for NIC " + PASSTHROUGH_MAC in rows["whole"]["problem"]
    assert rows["whole"]["state"] != "active"
    # The mirror made before is wanted by nothing now: listed as an orphan until a reconcile removes it.
    assert [row["flow"] for row in status if row["state"] == "orphan"] == ["whole"]
    assert tc_on(mlab.guest)  # the mirror made before the passthrough NIC came ...
    with Client(driver="kvm", state=state, uri=mlab.uri) as vtap:
        vtap.reconcile()
    assert tc_on(mlab.guest) == []  # ... is gone: it would have looked like the whole VM's traffic
    assert run_vtap(mlab, state, "session", "delete", "s").returncode == 0
