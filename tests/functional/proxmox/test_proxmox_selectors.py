"""Selector flows on a Proxmox cluster (fakepve): tags and pools read from /cluster/resources; a tag
changed through the API moves the tap at the next agent cycle. Frames counted at the node's target."""

import json

from proxmoxer import ProxmoxAPI

from pve_lab import PASSWORD, cli_env, start_agent, stop_agent, vtap, wait_for

INTERVAL = 0.5


def set_tags(cluster, vmid, node, tags):
    host, port = cluster.url.split("//")[1].split("/")[0].split(":")
    api = ProxmoxAPI(host, port=int(port), user="root@pam", password=PASSWORD, verify_ssl=cluster.cafile)
    api.nodes(node).qemu(vmid).config.put(tags=tags)


def test_selector_follows_tags_and_pools(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web-1", "pve1").config["tags"] = "pci"
    cluster.add_vm(101, "web-2", "pve1").config["tags"] = "lab"
    cluster.pve.add_vm(102, "db", node="pve1", status="running", pool="dmz",
                       config={"net0": "virtio=BC:24:11:01:02:00,bridge=vmbr0"})
    pve1 = nodes("pve1")
    for vmid in (100, 101, 102):
        pve1.add_tap(vmid)
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "ids", "--to", "port:mon0").returncode == 0
    added = vtap(env, "flow", "add", "ids", "--select", "tag=pci", "--direction", "out", "--name", "pci")
    assert added.returncode == 0, added.stderr
    assert vtap(env, "flow", "add", "ids", "--select", "pool=dmz", "--direction", "out", "--name", "dmz").returncode == 0
    assert "mirred" in pve1.filters("tap100i0") and "mirred" in pve1.filters("tap102i0")
    assert pve1.filters("tap101i0") == ""
    vms = {vm["name"]: vm for vm in json.loads(vtap(env, "vm", "list", "-o", "json").stdout)}
    assert vms["web-1"]["tags"] == ["pci"] and vms["db"]["pool"] == "dmz"

    agent = start_agent(env, INTERVAL)
    try:
        pve1.send_from_vm(100, count=5)
        pve1.send_from_vm(101, count=3)
        assert pve1.received() == 5
        set_tags(cluster, 100, "pve1", "lab")
        set_tags(cluster, 101, "pve1", "pci;web")
        wait_for(lambda: "mirred" in pve1.filters("tap101i0"))
        wait_for(lambda: pve1.filters("tap100i0") == "")
        pve1.send_from_vm(100, count=3)
        pve1.send_from_vm(101, count=4)
        pve1.send_from_vm(102, count=2)
        assert pve1.received() == 5 + 4 + 2
    finally:
        code, log = stop_agent(agent)
    assert code == 0, log
    assert "Traceback" not in log, log


def test_a_key_proxmox_cannot_read_is_refused(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web-1", "pve1")
    pve1 = nodes("pve1")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "ids", "--to", "port:mon0").returncode == 0
    refused = vtap(env, "flow", "add", "ids", "--select", "folder=/DC0/vm/dmz")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "vtap: driver proxmox cannot do selector key 'folder': keys here: host, name, network, pool, tag"
    assert vtap(env, "flow", "list", "-o", "json").stdout.strip() == "[]"
