"""A selector flow on real guests: a VM defined and started later with a matching tag is tapped by
the running follower (frames counted at the target); retagged, it is untapped."""

import json
import signal
import subprocess

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")

from . import kvm_lab as lab
from .kvm_lab import host_devices, wait_for, wait_sending
from .test_kvm_follow import mirrored, vtap


def test_follower_taps_a_new_matching_vm_and_untaps_it_when_retagged(libvirt_host, lan, guests, tmp_path):
    host, state = libvirt_host, tmp_path / "s.db"
    vtap(host, state, "session", "create", "pci", "--to", f"port:{lan.monitor}")
    vtap(host, state, "flow", "add", "pci", "--select", "tag=pci", "--direction", "out", "--name", "pci-vms")
    other, _ = guests.start(lan, 31, tags=("lab",))  # running, but not a member

    log = open(tmp_path / "follow.log", "w")
    follower = subprocess.Popen(["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(state), "follow", "--interval", "300"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        dom, (mac,) = guests.start(lan, 32, tags=("web", "pci"))
        (device,) = host_devices(dom)
        wait_for(lambda: mirrored(device), 30, f"the follower to tap new matching VM {dom.name()} on {device}")
        assert not mirrored(host_devices(other)[0])
        wait_sending(device)
        counts = lab.count_frames(lan.counter, mac, 15, until=("out", 5))
        assert counts["out"] >= 5 and counts["in"] == 0, counts
        (row,) = json.loads(vtap(host, state, "status", "-o", "json"))
        assert row["state"] == "active" and [m["name"] for m in row["members"]] == [dom.name()]

        # Retag: the metadata-change event is the hint; the tap goes.
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, lab.metadata_xml(["web"]), "vtap", "urn:vtap:1", libvirt.VIR_DOMAIN_AFFECT_LIVE)
        wait_for(lambda: not mirrored(device), 30, f"the follower to untap retagged VM {dom.name()}")
        (row,) = json.loads(vtap(host, state, "status", "-o", "json"))
        assert row["members"] == [] and row["state"] == "inactive"
        audit = json.loads(vtap(host, state, "audit", "-o", "json"))
        changes = [c for r in audit if "selector membership" in r["command"] for c in r["change"]["members"]]
        assert [c.get("joined", "").split("#")[0] for c in changes if "joined" in c] == [dom.UUIDString()]
        assert [c.get("left", "").split("#")[0] for c in changes if "left" in c] == [dom.UUIDString()]
    finally:
        follower.send_signal(signal.SIGTERM)
        code = follower.wait(20)
        log.close()
    assert code == 0, (tmp_path / "follow.log").read_text()
