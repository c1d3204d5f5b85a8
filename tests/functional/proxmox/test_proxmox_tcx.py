"""datapath=tcx on a PVE node (fakepve + the real kernel): the VM's tap mirrored from its tcx hook."""

import json
import os

import pytest
from pve_lab import cli_env, vm_uuid, vtap

from vtap_drivers.linux import bpfsys, tcxmirror


def test_flow_on_this_node_goes_on_the_taps_tcx_hook_and_copies_arrive(cluster, nodes, tmp_path):
    if not bpfsys.tcx_supported():
        pytest.skip(f"this kernel ({os.uname().release}) has no tcx hook")
    cluster.add_vm(100, "web", "pve1")
    pve1 = nodes("pve1")
    pve1.add_tap(100)
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name, VTAP_DATAPATH="tcx")
    directory = tcxmirror.pin_dir(pve1.name)
    try:
        assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
        result = vtap(env, "flow", "add", "web", "--vm", vm_uuid(100), "--direction", "out")
        assert result.returncode == 0, result.stderr
        assert "mirred" not in pve1.filters("tap100i0")
        assert len(os.listdir(directory)) == 1
        pve1.send_from_vm(100, count=10)
        assert pve1.received() == 10
        status = json.loads(vtap(env, "status", "-o", "json").stdout)
        assert status[0]["state"] == "active" and status[0]["packets"] == 10
        assert vtap(env, "session", "delete", "web").returncode == 0
        assert os.listdir(directory) == []
    finally:
        with tcxmirror.in_netns(pve1.name):
            for name in os.listdir(directory) if os.path.isdir(directory) else []:
                tcxmirror.detach(os.path.join(directory, name))
        if os.path.isdir(directory):
            os.rmdir(directory)
