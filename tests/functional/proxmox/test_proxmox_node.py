"""A PVE node's side against fakepve and the real kernel: taps on tap<vmid>i<n>, copies counted at the target."""

import json

from pve_lab import cli_env, vm_uuid, vtap


def test_flow_on_this_node_is_applied_at_once_and_copies_arrive(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1", firewall=True)
    pve1 = nodes("pve1")
    pve1.add_tap(100, firewall=True)  # firewall=1: the tap sits behind fwbr100i0
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
    result = vtap(env, "flow", "add", "web", "--vm", vm_uuid(100), "--direction", "out")
    assert result.returncode == 0, result.stderr
    assert "applied on this node (pve1) for VM 100" in result.stdout
    assert "mirred" in pve1.filters("tap100i0")
    pve1.send_from_vm(100, count=10)
    assert pve1.received() == 10
    status = json.loads(vtap(env, "status", "-o", "json").stdout)
    assert status[0]["state"] == "active" and status[0]["packets"] == 10


def test_flow_for_a_vm_elsewhere_is_recorded_and_its_node_agent_applies_it(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    pve1, pve2 = nodes("pve1"), nodes("pve2")
    pve1.add_tap(100)
    on_pve2 = cli_env(cluster, "pve2", tmp_path, VTAP_PROXMOX_NETNS=pve2.name)
    assert vtap(on_pve2, "session", "create", "web", "--to", "port:mon0").returncode == 0
    result = vtap(on_pve2, "flow", "add", "web", "--vm", "web")
    assert result.returncode == 0, result.stderr
    assert "recorded only for VM 100: it runs on node pve1; that node's agent or hookscript applies it" in result.stdout
    assert pve1.filters("tap100i0") == ""
    on_pve1 = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    result = vtap(on_pve1, "agent", "--once")
    assert result.returncode == 0, result.stderr
    assert "node pve1: 2 applied" in result.stdout  # both hooks of direction both
    pve1.send_from_vm(100, count=7)
    assert pve1.received() == 7


def test_bad_input_is_one_line_exit_2_and_changes_nothing(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1", nics=2)
    pve1 = nodes("pve1")
    pve1.add_tap(100)
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
    cases = [
        (("--vm", "999"), "vtap: vm: no VM with vmid '999' on this cluster"),
        (("--vm", "100/net5"), "vtap: nic: VM 100 (web) has no net5; its NICs: net0, net1"),
        (("--vm", "100", "--nic", "bc:24:11:99:99:99"), "vtap: nic: VM 100 (web) has no NIC with MAC bc:24:11:99:99:99; its NICs: net0, net1"),
        (("--vm", "100", "--filter", "tcp port"), "vtap: filter:"),
    ]
    for args, line in cases:
        result = vtap(env, "flow", "add", "web", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(line) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    cluster.add_vm(101, "db", "pve2")  # realized by another node: still checked here
    result = vtap(env, "flow", "add", "web", "--vm", "db", "--filter", "tcp port")
    assert result.returncode == 2 and result.stderr.startswith("vtap: filter:"), result.stderr
    assert json.loads(vtap(env, "flow", "list", "-o", "json").stdout) == []
    assert pve1.filters("tap100i0") == ""
    result = vtap(env, "session", "create", "gre", "--to", "gre://192.0.2.1?key=1")
    assert result.returncode == 2 and "driver proxmox cannot do" in result.stderr


def test_a_nic_added_without_a_task_is_found_before_refusing(cluster, nodes, tmp_path):
    vm = cluster.add_vm(100, "web", "pve2")
    pve1 = nodes("pve1")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "vm", "list").returncode == 0  # the node's inventory cache now knows net0 only
    vm.config["net1"] = "virtio=BC:24:11:01:00:01,bridge=vmbr1"  # a synchronous config change: no task
    assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
    result = vtap(env, "flow", "add", "web", "--vm", "100/net1")
    assert result.returncode == 0, result.stderr


def test_agent_refuses_a_node_the_cluster_does_not_have(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    pve1 = nodes("pve1")
    result = vtap(cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name), "agent", "--once", "--node", "pve9")
    assert result.returncode == 2
    assert result.stderr.strip() == "vtap: node: 'pve9' is not a node of this cluster (nodes: pve1); set --node or VTAP_PROXMOX_NODE"


def test_vxlan_target_is_made_on_the_node_that_mirrors(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    pve1 = nodes("pve1")
    pve1.add_tap(100)
    pve1.run("ip", "addr", "add", "192.0.2.1/24", "dev", "mon0")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "tun", "--to", "vxlan://192.0.2.9?vni=42").returncode == 0
    result = vtap(env, "flow", "add", "tun", "--vm", "web", "--direction", "out")
    assert result.returncode == 0, result.stderr
    links = json.loads(pve1.run("ip", "-s", "-d", "-j", "link", "show", "type", "vxlan").stdout)
    assert len(links) == 1 and links[0]["linkinfo"]["info_data"]["id"] == 42
    pve1.send_from_vm(100, count=5)
    links = json.loads(pve1.run("ip", "-s", "-j", "link", "show", links[0]["ifname"]).stdout)
    assert links[0]["stats64"]["tx"]["packets"] == 5  # each copy left encapsulated towards 192.0.2.9
    assert vtap(env, "session", "delete", "tun").returncode == 0
    assert json.loads(pve1.run("ip", "-j", "link", "show", "type", "vxlan").stdout) == []
