"""datapath=tcx with the kvm driver's tc backend: a real QEMU guest's vnet device mirrored from its tcx hook."""

import json
import os
import subprocess

import pytest

from vtap_drivers.linux import bpfsys, tcxmirror

from . import kvm_lab as lab
from .kvm_lab import host_devices, make_lan, sh, wait_sending


def vtap(host, state, *args):
    env = dict(os.environ, VTAP_DATAPATH="tcx")
    run = subprocess.run(["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(state), *args], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, f"vtap {' '.join(args)} -> {run.returncode}: {run.stderr}"
    return run


def test_vm_tapped_from_the_tcx_hook_direction_honoured_status_active(libvirt_host, module_guests, tmp_path):
    if not bpfsys.tcx_supported():
        pytest.skip(f"this kernel ({os.uname().release}) has no tcx hook")
    state = tmp_path / "s.db"
    before = set(os.listdir(tcxmirror.pin_dir(None))) if os.path.isdir(tcxmirror.pin_dir(None)) else set()
    with make_lan() as lan:
        dom, (mac,) = module_guests.start(lan, 10)
        (device,) = host_devices(dom)
        wait_sending(device)
        try:
            vtap(libvirt_host, state, "session", "create", "web", "--to", f"port:{lan.monitor}")
            vtap(libvirt_host, state, "flow", "add", "web", "--vm", dom.UUIDString(), "--direction", "out")
            assert "mirred" not in sh(f"tc filter show dev {device} ingress; tc filter show dev {device} egress")
            assert len(set(os.listdir(tcxmirror.pin_dir(None))) - before) == 1
            counts = lab.count_frames(lan.counter, mac, 15, until=("out", 5))
            assert counts["out"] >= 5 and counts["in"] == 0, counts
            (row,) = json.loads(vtap(libvirt_host, state, "status", "-o", "json").stdout)
            assert row["state"] == "active" and row["packets"] >= 5
            vtap(libvirt_host, state, "session", "delete", "web")
            assert set(os.listdir(tcxmirror.pin_dir(None))) == before
        finally:
            for name in set(os.listdir(tcxmirror.pin_dir(None))) - before if os.path.isdir(tcxmirror.pin_dir(None)) else ():
                tcxmirror.detach(os.path.join(tcxmirror.pin_dir(None), name))
