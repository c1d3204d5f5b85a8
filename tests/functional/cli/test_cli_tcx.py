"""The datapath setting through the CLI: VTAP_DATAPATH=tcx mirrors on the tcx hook; a bad value changes nothing."""

import json
import os
import subprocess
import sys

import pytest

from vtap_drivers.linux import bpfsys, tcxmirror


def test_a_bad_datapath_is_one_line_exit_2_and_changes_nothing(host):
    host.vtap_ok("session", "create", "base", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "base", "--interface", "eth0", "--filter", "udp")
    store, kernel = host.store(), host.kernel()
    bad = dict(os.environ, VTAP_DATAPATH="xdp")
    for args in (["flow", "add", "base", "--interface", "wire0"], ["session", "create", "s2", "--to", "port:mon0"], ["session", "delete", "base"], ["status"]):
        result = host.vtap(*args, env=bad)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "datapath" in lines[0] and "tc" in lines[0] and "tcx" in lines[0], (args, result.stderr)
        assert host.store() == store, args
        assert host.kernel() == kernel, args
    assert not os.path.exists(tcxmirror.pin_dir(host.name))


def test_datapath_tcx_from_the_environment_status_active(host):
    if not bpfsys.tcx_supported():
        pytest.skip(f"this kernel ({os.uname().release}) has no tcx hook")
    env = dict(os.environ, VTAP_DATAPATH="tcx", VTAP_LINUX_NETNS=host.name)

    def vtap(*args):  # not through `ip netns exec`: its own /sys has no bpffs to keep pins in
        result = subprocess.run([sys.executable, "-m", "vtap_cli.main", "--state", host.state, *args], capture_output=True, text=True, env=env)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    try:
        vtap("session", "create", "s", "--to", "port:mon0")
        vtap("flow", "add", "s", "--interface", "eth0", "--direction", "in")
        assert len(os.listdir(tcxmirror.pin_dir(host.name))) == 1
        assert host.filters("eth0", "ingress") == [] and "clsact" not in host.sh("tc", "qdisc", "show", "dev", "eth0").stdout
        status = vtap("-o", "json", "status")
        assert {row["state"] for row in json.loads(status)} == {"active"}, status
        vtap("session", "delete", "s")
        assert os.listdir(tcxmirror.pin_dir(host.name)) == []
    finally:
        directory = tcxmirror.pin_dir(host.name)
        with tcxmirror.in_netns(host.name):
            for name in os.listdir(directory) if os.path.isdir(directory) else []:
                tcxmirror.detach(os.path.join(directory, name))
        if os.path.isdir(directory):
            os.rmdir(directory)


def test_under_ip_netns_exec_tcx_falls_back_to_cls_bpf_and_copies_still_go(host):
    """`ip netns exec` mounts a /sys of its own, without bpffs: pins would die with the command."""
    env = dict(os.environ, VTAP_DATAPATH="tcx")
    assert host.vtap("session", "create", "s", "--to", "port:mon0", env=env).returncode == 0
    result = host.vtap("flow", "add", "s", "--interface", "eth0", "--direction", "in", env=env)
    assert result.returncode == 0, result.stderr
    assert "ip netns exec" in result.stderr  # the log says why
    assert sum(1 for f in host.filters("eth0", "ingress") if f.get("kind") == "bpf" and "options" in f) == 1
    assert not os.path.exists(tcxmirror.pin_dir(None)) or not os.listdir(tcxmirror.pin_dir(None))
    status = host.vtap("-o", "json", "status", env=env)
    assert {row["state"] for row in json.loads(status.stdout)} == {"active"}, status.stdout
