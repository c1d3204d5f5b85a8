"""A real QEMU guest whose NIC is a macvtap (libvirt `<interface type='direct'>`), tapped per direction.

The macvtap sits on a veth "physical" NIC plugged into the lan bridge, so the guest pings the
lan's peer through it. Copies go to the lan's monitor port and are counted per direction from
the guest's point of view: out = its echo requests (sent by its MAC), in = the replies to it.
"""

import json
import subprocess
import uuid as uuidlib

import pytest

from . import kvm_lab as lab
from .kvm_lab import host_devices, sh


def vtap(host, state, *args):
    run = subprocess.run(["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(state), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"vtap {' '.join(args)} -> {run.returncode}: {run.stderr}"
    return run


@pytest.fixture
def macvtap_guest(libvirt_host, lan, guests, kvm_workdir):
    tag = uuidlib.uuid4().hex[:6]
    lower, port = f"vtkd{tag}", f"vtke{tag}"
    sh(f"ip link add {lower} type veth peer name {port}")
    try:
        for name in (lower, port):
            sh(f"sysctl -qw net.ipv6.conf.{name}.disable_ipv6=1 || true; ip link set {name} up")
        sh(f"ip link set {port} master {lan.bridge}")
        uuid = str(uuidlib.uuid4())
        mac = f"52:54:00:{int(lan.subnet.split('.')[2]):02x}:d0:01"
        nic = f"<interface type='direct'><mac address='{mac}'/><source dev='{lower}' mode='bridge'/><model type='virtio'/><rom enabled='no'/></interface>"
        xml = lab.domain_xml(f"vtk-{uuid[:8]}", uuid, [], lan.bridge, lan.ip(20), lan.ip(1), kvm_workdir).replace("<devices>", "<devices>" + nic, 1)
        dom = guests.conn.defineXML(xml)
        guests.uuids.append(uuid)
        dom.create()
        (device,) = host_devices(dom)
        sh(f"sysctl -qw net.ipv6.conf.{device}.disable_ipv6=1")  # the host's own IPv6 frames on it would carry the guest's MAC
        booted = lab.count_frames(lan.peer, mac, 120, until=("ipv4_out", 1), outgoing=True)  # the guest's first ping on the wire
        assert booted["ipv4_out"] >= 1, booted
        yield dom, mac, device
    finally:
        subprocess.run(["ip", "link", "del", lower], capture_output=True)


def test_macvtap_guest_out_is_what_it_sends_and_in_what_it_receives(libvirt_host, lan, macvtap_guest, tmp_path):
    dom, mac, device = macvtap_guest
    assert "macvtap" in sh(f"ip -d link show {device}")
    state = tmp_path / "s.db"
    vtap(libvirt_host, state, "session", "create", "m", "--to", f"port:{lan.monitor}")
    vtap(libvirt_host, state, "flow", "add", "m", "--vm", dom.UUIDString(), "--direction", "out", "--name", "m-out")
    counts = lab.count_frames(lan.counter, mac, 20, until=("out", 5))
    assert counts["out"] >= 5 and counts["in"] == 0, counts
    vtap(libvirt_host, state, "flow", "delete", "m-out")
    vtap(libvirt_host, state, "flow", "add", "m", "--vm", dom.UUIDString(), "--direction", "in", "--name", "m-in")
    counts = lab.count_frames(lan.counter, mac, 20, until=("in", 5))
    assert counts["in"] >= 5 and counts["out"] == 0, counts
    rows = json.loads(vtap(libvirt_host, state, "status", "-o", "json").stdout)
    assert [(r["flow"], r["state"]) for r in rows] == [("m-in", "active")] and rows[0]["packets"] >= 5
    vtap(libvirt_host, state, "session", "delete", "m")
    assert "mirred" not in sh(f"tc filter show dev {device} ingress; tc filter show dev {device} egress")
