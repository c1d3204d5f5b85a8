"""A real QEMU guest on a Linux bridge, tapped by UUID with the tc backend,
through the `vtap` command line; copies counted on the target port per
direction. Bad input is refused with one line and exit 2, changing nothing."""

import json
import subprocess
from dataclasses import dataclass

import pytest

from .kvm_lab import host_devices, make_lan, sh, wait_for, wait_sending
from . import kvm_lab as lab


@dataclass
class Tapped:
    lan: object
    dom: object
    mac: str
    device: str

    @property
    def uuid(self):
        return self.dom.UUIDString()


@pytest.fixture(scope="module")
def guest(module_guests):
    with make_lan() as lan:
        dom, (mac,) = module_guests.start(lan, 10)
        (device,) = host_devices(dom)
        wait_sending(device)
        yield Tapped(lan, dom, mac, device)


def vtap(host, state, *args, check=True):
    run = subprocess.run(["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(state), *args], capture_output=True, text=True, timeout=60)
    if check and run.returncode != 0:
        raise AssertionError(f"vtap {' '.join(args)} -> {run.returncode}: {run.stderr}")
    return run


def tc_filters(device: str) -> str:
    return sh(f"tc filter show dev {device} ingress; tc filter show dev {device} egress")


def test_vm_list_shows_nics_with_host_devices(libvirt_host, guest, tmp_path):
    rows = json.loads(vtap(libvirt_host, tmp_path / "s.db", "vm", "list", "-o", "json").stdout)
    (row,) = [r for r in rows if r["uuid"] == guest.uuid]
    assert row["name"] == guest.dom.name() and row["state"] == "running"
    assert row["nics"] == [{"mac": guest.mac, "device": guest.device, "network": guest.lan.bridge, "type": "bridge"}]


def test_tap_vm_by_uuid_counts_frames_per_direction(libvirt_host, guest, tmp_path):
    lan, mac, device, state = guest.lan, guest.mac, guest.device, tmp_path / "s.db"
    vtap(libvirt_host, state, "session", "create", "web", "--to", f"port:{lan.monitor}")

    # out = sent by the VM: its echo requests, nothing addressed to it.
    vtap(libvirt_host, state, "flow", "add", "web", "--vm", guest.uuid, "--direction", "out", "--name", "f-out")
    counts = lab.count_frames(lan.counter, mac, 15, until=("out", 5))
    assert counts["out"] >= 5 and counts["in"] == 0, counts
    vtap(libvirt_host, state, "flow", "delete", "f-out")
    assert "mirred" not in tc_filters(device)

    # in = received by the VM: the peer's echo replies, nothing it sent.
    vtap(libvirt_host, state, "flow", "add", "web", "--vm", guest.uuid, "--direction", "in", "--name", "f-in")
    counts = lab.count_frames(lan.counter, mac, 15, until=("in", 5))
    assert counts["in"] >= 5 and counts["out"] == 0, counts
    status = json.loads(vtap(libvirt_host, state, "status", "-o", "json").stdout)
    assert [(r["flow"], r["state"]) for r in status] == [("f-in", "active")]
    assert status[0]["packets"] >= 5

    # A filter expression, both ways, by VM name: echo requests only, so nothing it receives.
    vtap(libvirt_host, state, "flow", "delete", "f-in")
    vtap(libvirt_host, state, "flow", "add", "web", "--vm", guest.dom.name(), "--filter", "icmp[icmptype] == icmp-echo", "--name", "f-req")
    counts = lab.count_frames(lan.counter, mac, 15, until=("out", 5))
    assert counts["out"] >= 5 and counts["in"] == 0, counts

    vtap(libvirt_host, state, "session", "delete", "web")
    assert "mirred" not in tc_filters(device)
    assert lab.count_frames(lan.counter, mac, 1.0)["out"] == 0


def test_bad_input_is_refused_and_changes_nothing(libvirt_host, guest, module_guests, tmp_path):
    state = tmp_path / "s.db"
    vtap(libvirt_host, state, "session", "create", "mon", "--to", f"port:{guest.lan.monitor}")
    vtap(libvirt_host, state, "session", "create", "self", "--to", f"vm:{guest.uuid}")
    nonic = module_guests.define_without_nics(guest.lan)
    before = vtap(libvirt_host, state, "flow", "list", "-o", "json").stdout
    audit = vtap(libvirt_host, state, "audit", "-o", "json").stdout
    cases = [
        (("flow", "add", "mon", "--vm", "no-such-vm"), "no VM with UUID or name 'no-such-vm'"),
        (("flow", "add", "mon", "--vm", "7f000000-0000-4000-8000-000000000001"), "no VM with UUID or name"),
        (("flow", "add", "mon", "--vm", nonic.UUIDString()), "has no network interfaces"),
        (("flow", "add", "mon", "--vm", guest.uuid, "--nic", "52:54:00:ff:ff:ff"), "nic: 52:54:00:ff:ff:ff is not a NIC of VM"),
        (("flow", "add", "self", "--vm", guest.uuid), "is the source of flow"),
        (("flow", "add", "mon", "--vm", guest.uuid, "--filter", "tcp port"), "filter"),
    ]
    for args, message in cases:
        run = vtap(libvirt_host, state, *args, check=False)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr and run.stderr.count("\n") == 1, (args, run.stderr)
    assert vtap(libvirt_host, state, "flow", "list", "-o", "json").stdout == before
    assert vtap(libvirt_host, state, "audit", "-o", "json").stdout == audit
    assert "mirred" not in tc_filters(guest.device)

    # A libvirtd that is not there is a failure of the platform (exit 1), not of the input.
    run = subprocess.run(["vtap", "--driver", "kvm", "--uri", f"qemu:///system?socket={tmp_path}/none", "--state", str(state), "vm", "list"], capture_output=True, text=True)
    assert run.returncode == 1 and "cannot connect to libvirt" in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_vm_target_delivers_copies_to_the_monitoring_vms_nic(libvirt_host, guest, module_guests, tmp_path):
    state = tmp_path / "s.db"
    with make_lan() as quiet:  # the monitoring VM alone on a bridge: whatever reaches it of the guest is a copy
        monitor, (monitor_mac,) = module_guests.start(quiet, 40)
        (monitor_device,) = host_devices(monitor)
        vtap(libvirt_host, state, "session", "create", "tovm", "--to", f"vm:{monitor.UUIDString()}#{monitor_mac}")
        vtap(libvirt_host, state, "flow", "add", "tovm", "--vm", guest.uuid, "--direction", "out")
        counts = lab.count_frames(monitor_device, guest.mac, 15, until=("out", 5), outgoing=True)
        assert counts["out"] >= 5, counts
        vtap(libvirt_host, state, "session", "delete", "tovm")
        assert "mirred" not in tc_filters(guest.device)
        monitor.destroy()


def test_pcap_target_records_the_guests_frames(libvirt_host, guest, tmp_path):
    from scapy.utils import rdpcap

    state, path = tmp_path / "s.db", tmp_path / "guest.pcapng"
    vtap(libvirt_host, state, "session", "create", "rec", "--to", f"pcap:{path}")
    vtap(libvirt_host, state, "flow", "add", "rec", "--vm", guest.uuid, "--direction", "out")
    src = bytes(int(x, 16) for x in guest.mac.split(":"))

    def recorded():
        try:
            return [bytes(p) for p in rdpcap(str(path))]
        except Exception:  # not written yet, or a block still being written
            return []

    wait_for(lambda: sum(frame[6:12] == src for frame in recorded()) >= 5, 20, "5 of the guest's frames in the pcapng file")
    assert all(frame[6:12] == src for frame in recorded())  # out only: nothing addressed to it
    vtap(libvirt_host, state, "session", "delete", "rec")
    assert "mirred" not in tc_filters(guest.device)
