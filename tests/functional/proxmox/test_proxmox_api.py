"""The PVE API side against fakepve: inventory, what a poll costs, faults, bad credentials."""

import json

import pytest
from pve_lab import cli_env, vm_uuid, vtap

from vtap_core.errors import TemporaryError, ValidationError
from vtap_drivers.proxmox.api import PveApi
from vtap_drivers.proxmox.inventory import Inventory


def api_for(cluster, **kw):
    options = dict(url=cluster.url, user="root@pam", password="secret", cafile=cluster.cafile)
    options.update(kw)
    return PveApi(**options)


def test_vm_list_shows_uuid_node_state_and_nics(cluster, tmp_path):
    cluster.add_vm(100, "web", "pve1", nics=2, firewall=True)
    cluster.add_vm(101, "db", "pve2", status="stopped")
    cluster.add_vm(102, "legacy", "pve2", uuid_=False)
    result = vtap(cli_env(cluster, "pve1", tmp_path), "vm", "list", "-o", "json")
    assert result.returncode == 0, result.stderr
    vms = {vm["vmid"]: vm for vm in json.loads(result.stdout)}
    assert vms[100]["uuid"] == vm_uuid(100) and vms[100]["host"] == "pve1" and vms[100]["state"] == "running"
    assert [n["device"] for n in vms[100]["nics"]] == ["tap100i0", "tap100i1"]
    assert vms[100]["nics"][0]["firewall"] is True and vms[100]["nics"][0]["network"] == "vmbr0"
    assert vms[101]["state"] == "stopped" and vms[101]["host"] == "pve2"
    assert vms[102]["uuid"] == "" and "addressable by vmid" in vms[102]["warning"]
    assert "VM 102 has no smbios1 UUID" in result.stderr


def test_unchanged_poll_costs_two_requests_and_a_move_one_config(cluster):
    for vmid in range(100, 130):
        cluster.add_vm(vmid, f"vm{vmid}", f"pve{vmid % 3 + 1}")
    api = api_for(cluster)
    inventory = Inventory(api, "pve1")
    assert inventory.poll() == set(range(100, 130))
    before = api.calls
    assert inventory.poll() == set()
    assert api.calls - before == 2  # /cluster/resources + this node's tasks
    cluster.migrate(101, "pve1")
    before = api.calls
    assert inventory.poll() == {101}
    assert api.calls - before == 3  # ... + the moved VM's config
    assert inventory.vm(101).node == "pve1"


def test_expired_ticket_is_renewed_and_faults_are_temporary(cluster):
    cluster.add_vm(100, "web", "pve1")
    api = api_for(cluster)
    inventory = Inventory(api, "pve1")
    inventory.poll()
    cluster.pve.revoke_tickets()  # every ticket is now rejected with 401
    inventory.poll()  # logs in again by itself
    cluster.pve.fail("GET", "/cluster/resources", 500, "internal error", times=1)
    with pytest.raises(TemporaryError, match="500"):
        inventory.poll()
    cluster.pve.set_node_offline("pve1")
    with pytest.raises(TemporaryError, match="595"):
        inventory.poll()  # this node's task list: no route to host
    cluster.pve.set_node_offline("pve1", False)
    inventory.poll()
    assert inventory.vm(100).running


def test_bad_token_is_one_clear_line_exit_2(cluster, tmp_path):
    cluster.pve.apitokens["root@pam!vtap"] = "right-secret"
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_TOKEN_NAME="vtap", VTAP_PROXMOX_TOKEN_VALUE="wrong-secret")
    del env["VTAP_PROXMOX_PASSWORD"]
    result = vtap(env, "vm", "list")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"vtap: credentials: {cluster.url} refused the API token of root@pam!vtap (401)"]
    assert "wrong-secret" not in result.stderr + result.stdout
    env["VTAP_PROXMOX_TOKEN_VALUE"] = "right-secret"
    assert vtap(env, "vm", "list").returncode == 0


def test_wrong_password_unreachable_host_and_unverified_tls(cluster, tmp_path):
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_PASSWORD="nope")
    result = vtap(env, "vm", "list")
    assert result.returncode == 2 and "refused the login of root@pam" in result.stderr and "nope" not in result.stderr
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_URL="https://127.0.0.1:1")
    result = vtap(env, "vm", "list")
    assert result.returncode == 1
    assert result.stderr.strip() == "vtap: cannot reach https://127.0.0.1:1: Connection refused"
    env = cli_env(cluster, "pve1", tmp_path)
    del env["VTAP_PROXMOX_CAFILE"]
    result = vtap(env, "vm", "list")
    assert result.returncode == 1 and "TLS verification of" in result.stderr and "--insecure" in result.stderr
    assert vtap(env, "--insecure", "vm", "list").returncode == 0


def test_missing_settings_name_the_setting():
    with pytest.raises(ValidationError, match="^password: needed"):
        PveApi(url="https://127.0.0.1:8006", user="root@pam")
    with pytest.raises(ValidationError, match="^url: needed"):
        PveApi(url=None, user="root@pam", password="x")


def test_watch_hints_at_the_vm_that_moved(cluster, tmp_path, monkeypatch):
    import threading

    from vtap_drivers.proxmox import driver as proxmox_driver
    from pve_lab import vm_uuid, wait_for

    monkeypatch.setattr(proxmox_driver, "WATCH_INTERVAL", 0.05)
    cluster.add_vm(100, "web", "pve1")
    cluster.add_vm(101, "db", "pve2")
    driver = proxmox_driver.ProxmoxDriver(state_dir=str(tmp_path), **cluster.settings("pve1"))
    driver.refresh()
    stop, hints = threading.Event(), []
    thread = threading.Thread(target=lambda: hints.extend(driver.watch(stop)), daemon=True)
    thread.start()
    try:
        cluster.migrate(101, "pve1")
        wait_for(lambda: driver.cluster.vm(101).node == "pve1")
    finally:
        stop.set()
        thread.join(5)
    assert hints == [vm_uuid(101)]
