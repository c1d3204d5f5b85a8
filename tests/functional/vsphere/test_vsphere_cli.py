"""End to end through the `vtap` command line, as a user runs it against vCenter."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.fixture
def env(vcsim, tmp_path):
    (tmp_path / "empty.toml").write_text("")  # no machine-wide /etc/vtap/config.toml in the way
    return dict(os.environ, VTAP_VSPHERE_PASSWORD=vcsim.password, VTAP_STATE=str(tmp_path / "vtap.db"), VTAP_CONFIG=str(tmp_path / "empty.toml"))


@pytest.fixture
def vtap(vcsim, env):
    base = [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--url", vcsim.url, "--user", vcsim.user, "--insecure"]

    def run(*args, expect=0, background=False):
        if background:
            return subprocess.Popen([*base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        done = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == expect, f"vtap {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}"
        assert vcsim.password not in done.stdout + done.stderr
        return done

    return run


def test_vm_list_shows_uuid_host_and_port_keys(vtap, vc):
    listed = json.loads(vtap("-o", "json", "vm", "list").stdout)
    by_uuid = {row["uuid"]: row for row in listed}
    vm = vc.vm(0)
    row = by_uuid[vm.config.instanceUuid]
    assert row["name"] == vm.name
    assert row["host"] == vm.runtime.host._moId
    assert vc.port_key(vm) in json.dumps(row)


def test_session_create_flow_add_and_delete(vtap, vc):
    vm = vc.vm(2)
    vtap("session", "create", "cli", "--to", "erspan://192.0.2.99?version=2&id=9", "--snaplen", "200")
    vtap("flow", "add", "cli", "--vm", vm.config.instanceUuid, "--direction", "in")
    made = vc.sessions()["vtap:cli"]
    assert made.encapType == "erspan2" and made.erspanId == 9 and made.mirroredPacketLength == 200
    assert list(made.sourcePortTransmitted.portKey) == [vc.port_key(vm)]
    assert not made.sourcePortReceived.portKey
    (row,) = json.loads(vtap("-o", "json", "status").stdout)
    assert (row["session"], row["state"], row["direction"]) == ("cli", "active", "in")
    vtap("session", "delete", "cli")
    assert "vtap:cli" not in vc.sessions()


def test_filter_is_refused_and_nothing_changes(vtap, vc):
    vtap("session", "create", "nofilter", "--to", "gre://192.0.2.98")
    version = vc.version()
    done = vtap("flow", "add", "nofilter", "--vm", vc.vm(0).name, "--filter", "tcp port 443", expect=2)
    assert "whole ports" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert vc.version() == version
    assert json.loads(vtap("-o", "json", "flow", "list").stdout) == []
    vtap("session", "delete", "nofilter")


def test_password_on_argv_is_refused(vtap, vcsim):
    done = vtap("--password", vcsim.password, "vm", "list", expect=2)
    assert "password" in done.stderr


def test_follow_restores_a_deleted_session_and_stops_on_sigterm(vtap, vc, vcsim):
    from pyVmomi import vim

    vtap("session", "create", "kept", "--to", "gre://192.0.2.97")
    vtap("flow", "add", "kept", "--vm", vc.vm(3).config.instanceUuid)
    # A short resync period: whether the watch or the resync sees the deletion first, it is restored
    # (the watch itself is tested in test_vsphere_follow.py).
    follower = vtap("follow", "--interval", "2", background=True)
    try:
        time.sleep(2)
        key = vc.sessions()["vtap:kept"].key
        vc.reconfigure_vspan("remove", vim.dvs.VmwareDistributedVirtualSwitch.VspanSession(key=key))
        deadline = time.monotonic() + 10
        while "vtap:kept" not in vc.sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "vtap:kept" in vc.sessions(), "vtap follow did not restore the session"
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        out, err = follower.communicate(timeout=15)
    assert follower.returncode == 0, err
    assert vcsim.password not in out + err
    vtap("session", "delete", "kept")


def test_flow_whose_vm_runs_on_another_host_than_the_monitoring_vm_is_refused(vtap, vc):
    from pyVmomi import vim

    source, target = vc.vm(1), vc.vm(5)
    home, away = source.runtime.host, next(h for h in vc.hosts() if h != target.runtime.host)
    vtap("session", "create", "apart", "--to", f"vm:{target.config.instanceUuid}")
    vc.wait(source.RelocateVM_Task(vim.vm.RelocateSpec(host=away)))
    try:
        version = vc.version()
        done = vtap("flow", "add", "apart", "--vm", source.name, expect=2)
        assert len(done.stderr.strip().splitlines()) == 1 and "one ESXi host" in done.stderr
        assert vc.version() == version and "vtap:apart" not in vc.sessions()
        assert json.loads(vtap("-o", "json", "flow", "list").stdout) == []
    finally:
        vc.wait(source.RelocateVM_Task(vim.vm.RelocateSpec(host=home)))
    vtap("flow", "add", "apart", "--vm", source.name)  # back on the monitoring VM's host: mirrored
    assert list(vc.sessions()["vtap:apart"].sourcePortReceived.portKey) == [vc.port_key(source)]
    vtap("session", "delete", "apart")


def test_sample_above_65535_is_refused_and_nothing_changes(vtap, vc):
    version = vc.version()
    done = vtap("session", "create", "rare", "--to", "gre://192.0.2.96", "--sample", "65536", expect=2)
    assert len(done.stderr.strip().splitlines()) == 1 and "65535" in done.stderr
    assert vc.version() == version
    assert json.loads(vtap("-o", "json", "session", "list").stdout) == []
