"""Following VMs across the cluster: migration between node agents, and the hookscript as PVE calls it."""

import os
import subprocess

from pve_lab import cli_env, start_agent, stop_agent, vtap, wait_for

INTERVAL = 0.5


def test_migrated_vm_loses_its_tap_on_the_source_and_gets_it_on_the_destination(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    cluster.add_vm(101, "db", "pve2")
    pve1, pve2 = nodes("pve1"), nodes("pve2")
    pve1.add_tap(100)
    pve2.add_tap(101)
    on = {name: cli_env(cluster, name, tmp_path, VTAP_PROXMOX_NETNS=ns.name) for name, ns in (("pve1", pve1), ("pve2", pve2))}
    assert vtap(on["pve1"], "session", "create", "web", "--to", "port:mon0").returncode == 0
    assert vtap(on["pve1"], "flow", "add", "web", "--vm", "web", "--direction", "out").returncode == 0
    agents = {name: start_agent(env, INTERVAL) for name, env in on.items()}
    try:
        pve1.send_from_vm(100, count=5)
        assert pve1.received() == 5
        # Live migration: QEMU on pve2 has its tap before the switch-over; the source's goes after.
        pve2.add_tap(100)
        cluster.migrate(100, "pve2")
        wait_for(lambda: "mirred" in pve2.filters("tap100i0"))
        wait_for(lambda: pve1.filters("tap100i0") == "")
        pve1.send_from_vm(100, count=3)  # the old QEMU's last frames: no longer copied
        pve2.send_from_vm(100, count=4)
        pve1.del_tap(100)
        assert (pve1.received(), pve2.received()) == (5, 4)
        assert pve2.filters("tap101i0") == ""  # VMs without flows stay untouched
    finally:
        logs = {name: stop_agent(process) for name, process in agents.items()}
    for name, (code, text) in logs.items():
        assert code == 0, text
        assert "Traceback" not in text and "failed" not in text, text
    assert "node pve1: applied 0, removed 1" in logs["pve1"][1]
    assert "node pve2: applied 1, removed 0" in logs["pve2"][1]


def install_snippet(cluster, tmp_path, env, vmid=100):
    folder = tmp_path / "snip-storage"
    cluster.pve.storages["snip"] = {"type": "dir", "path": str(folder), "content": "snippets", "active": 1, "files": set()}
    result = vtap(env, "hook", "install", "--vm", str(vmid), "--storage", "snip")
    assert result.returncode == 0, result.stderr
    return str(folder / "snippets" / "vtap-hook.sh")


def run_as_pve(snippet, env, vmid, phase):
    """Exactly how PVE runs a hookscript: `<script> <vmid> <phase>`."""
    return subprocess.run([snippet, str(vmid), phase], env=env, capture_output=True, text=True, timeout=60)


def test_hookscript_applies_at_post_start_and_cleans_up_at_stop(cluster, nodes, tmp_path):
    vm = cluster.add_vm(100, "web", "pve1", status="stopped")
    pve1 = nodes("pve1")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    snippet = install_snippet(cluster, tmp_path, env)
    assert vm.config["hookscript"] == "snip:snippets/vtap-hook.sh"
    assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
    result = vtap(env, "flow", "add", "web", "--vm", "100", "--direction", "out")
    assert result.returncode == 0 and "recorded only for VM 100: it is stopped" in result.stdout
    assert run_as_pve(snippet, env, 100, "pre-start").returncode == 0
    # QEMU started: its tap exists. PVE's /cluster/resources still says "stopped" for a few seconds
    # (pvestatd lags); the hook trusts the phase it is called for.
    pve1.add_tap(100)
    result = run_as_pve(snippet, env, 100, "post-start")
    assert result.returncode == 0, result.stderr
    assert "VM 100 post-start on pve1: 1 applied, 0 removed" in result.stderr
    pve1.send_from_vm(100, count=6)
    assert pve1.received() == 6
    result = run_as_pve(snippet, env, 100, "pre-stop")
    assert result.returncode == 0 and "0 applied, 1 removed" in result.stderr
    assert pve1.filters("tap100i0") == ""
    pve1.del_tap(100)
    assert run_as_pve(snippet, env, 100, "post-stop").returncode == 0
