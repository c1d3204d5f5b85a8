"""LXC containers: listed beside VMs (identity: the vmid), tapped on their veth<vmid>i<n> host device."""

import json

from pve_lab import cli_env, vtap

from test_proxmox_follow import install_snippet, run_as_pve


def test_vm_list_shows_containers_with_their_veth_and_vmid_identity(cluster, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    cluster.add_ct(200, "cache", "pve1", nics=2)
    env = cli_env(cluster, "pve1", tmp_path)
    result = vtap(env, "vm", "list", "-o", "json")
    assert result.returncode == 0, result.stderr
    guests = {vm["vmid"]: vm for vm in json.loads(result.stdout)}
    ct = guests[200]
    assert (ct["uuid"], ct["name"], ct["host"], ct["state"], ct["type"]) == ("", "cache", "pve1", "running", "lxc")
    assert [(n["device"], n["mac"]) for n in ct["nics"]] == [("veth200i0", "bc:24:11:02:00:00"), ("veth200i1", "bc:24:11:02:00:01")]
    assert ct["warning"] == "container: no UUID, its identity is the vmid"
    assert guests[100]["type"] == "qemu" and [n["device"] for n in guests[100]["nics"]] == ["tap100i0"]
    assert "has no smbios1 UUID" not in result.stderr  # a container never has one: no warning for it
    table = vtap(env, "vm", "list").stdout
    assert "veth200i0" in table and "type=lxc" in table and "container: no UUID" in table


def test_container_is_tapped_on_its_veth_and_by_its_hookscript(cluster, nodes, tmp_path):
    cluster.add_ct(200, "cache", "pve1")
    pve1 = nodes("pve1")
    pve1.add_tap(200, prefix="veth")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "ct", "--to", "port:mon0").returncode == 0
    result = vtap(env, "flow", "add", "ct", "--vm", "cache", "--direction", "out")
    assert result.returncode == 0 and "applied on this node (pve1) for VM 200" in result.stdout, result.stdout + result.stderr
    assert "mirred" in pve1.filters("veth200i0")
    pve1.send_from_vm(200, count=7)  # what the container sends enters the host at veth200i0
    assert pve1.received() == 7
    status = json.loads(vtap(env, "status", "-o", "json").stdout)
    assert [(row["flow"], row["state"]) for row in status] == [("ct-1", "active")]

    # The container restarts: its hookscript (pve-container runs it too) takes the tap away and back.
    snippet = install_snippet(cluster, tmp_path, env, vmid=200)
    assert cluster.pve.ct(200).config["hookscript"] == "snip:snippets/vtap-hook.sh"
    result = run_as_pve(snippet, env, 200, "pre-stop")
    assert "0 applied, 1 removed" in result.stderr and pve1.filters("veth200i0") == "", result.stderr
    result = run_as_pve(snippet, dict(env, VTAP_PROXMOX_URL="https://127.0.0.1:1"), 200, "post-start")
    assert "1 applied, 0 removed" in result.stderr and "mirred" in pve1.filters("veth200i0"), result.stderr
