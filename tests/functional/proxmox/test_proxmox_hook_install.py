"""`vtap hook install`: the snippet on this node's storage and `hookscript` set through the API, or nothing at all."""

import os

from pve_lab import cli_env, vtap

VOLUME = "snip:snippets/vtap-hook.sh"


def snippet_storage(cluster, tmp_path, content="snippets,iso"):
    folder = tmp_path / "snip-storage"
    cluster.pve.storages["snip"] = {"type": "dir", "path": str(folder), "content": content, "active": 1, "files": set()}
    return folder / "snippets" / "vtap-hook.sh"


def hookscripts(cluster):
    return {vm.vmid: vm.config.get("hookscript") for vm in cluster.pve.vms}


def test_install_writes_the_snippet_and_sets_hookscript(cluster, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    cluster.add_vm(101, "db", "pve2")
    snippet = snippet_storage(cluster, tmp_path)
    env = cli_env(cluster, "pve1", tmp_path)
    result = vtap(env, "hook", "install", "--all", "--storage", "snip")
    assert result.returncode == 0, result.stderr
    assert hookscripts(cluster) == {100: VOLUME, 101: VOLUME}
    assert os.access(snippet, os.X_OK)
    text = snippet.read_text()
    assert text.startswith("#!/bin/sh") and "hook \"$1\" \"$2\"" in text and "secret" not in text
    assert "VMs 100, 101" in result.stdout
    # Again: nothing changes, and it says so.
    result = vtap(env, "hook", "install", "--vm", "100", "--storage", "snip")
    assert result.returncode == 0 and "(0 changed)" in result.stdout


def test_only_root_at_pam_may_install_and_nothing_changes(cluster, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    snippet = snippet_storage(cluster, tmp_path)
    cluster.pve.users["vtap@pve"] = "pw"
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_USER="vtap@pve", VTAP_PROXMOX_PASSWORD="pw")
    result = vtap(env, "hook", "install", "--vm", "100", "--storage", "snip")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vtap: user: only root@pam may set a VM's hookscript (PVE's rule, API tokens included); "
        "connected as vtap@pve: use --user root@pam with VTAP_PROXMOX_PASSWORD"]
    assert hookscripts(cluster) == {100: None} and not snippet.exists()


def test_bad_install_input_changes_nothing(cluster, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    cluster.add_vm(101, "db", "pve1")
    cluster.pve.vms[1].config["hookscript"] = "local:snippets/theirs.sh"
    snippet = snippet_storage(cluster, tmp_path)
    env = cli_env(cluster, "pve1", tmp_path)
    cases = [
        (("--vm", "999", "--storage", "snip"), "vtap: vm: PVE lists no VM 999"),
        (("--vm", "100", "--vm", "101", "--storage", "snip"), "vtap: hookscript: VM 101 already runs hookscript local:snippets/theirs.sh"),
        (("--vm", "100", "--storage", "nosuch"), "vtap: storage: 'nosuch'"),
        (("--vm", "100", "--storage", "local"), "vtap: storage: 'local' does not hold snippets"),
        (("--vm", "100"), "vtap: storage: hook install needs --storage"),
    ]
    for args, start in cases:
        result = vtap(env, "hook", "install", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(start) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert hookscripts(cluster) == {100: None, 101: "local:snippets/theirs.sh"} and not snippet.exists()
