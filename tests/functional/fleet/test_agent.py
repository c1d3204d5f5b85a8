"""`vtap agent` on linux-driver "hosts" (network namespaces) against a real etcd."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from fleetlib import mirrors_on, wait_for

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def machines():
    """Two namespaces with an eth0 each: host-a runs an agent, admin runs the CLI."""
    if not IS_ROOT:
        pytest.skip("needs root: creates network namespaces")
    names = {role: f"vtapf-{uuid.uuid4().hex[:8]}" for role in ("host-a", "admin")}
    for name in names.values():
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True)
    try:
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


def start_agent(url, netns, state):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
    env.update({"VTAP_STORE": url, "VTAP_HOST": "host-a", "VTAP_LINUX_NETNS": netns})
    command = [sys.executable, "-m", "vtap_cli.main", "--state", state, "agent", "--interval", "120", "--ttl", "3"]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def test_agent_registers_follows_changes_made_elsewhere_and_dies_with_its_lease(etcd, vtap, machines, tmp_path):
    url = etcd.url("vtap/prod")
    admin = {"VTAP_STORE": url, "VTAP_HOST": "admin", "VTAP_LINUX_NETNS": machines["admin"]}
    admin_state = str(tmp_path / "admin/state.db")

    def hosts():
        return json.loads(vtap("-o", "json", "hosts", state=admin_state, env=admin).stdout or "[]")

    agent = start_agent(url, machines["host-a"], str(tmp_path / "a/state.db"))
    try:
        listed = wait_for(lambda: [h for h in hosts() if h["last_reconcile"]])
        assert [(h["host"], h["driver"]) for h in listed] == [("host-a", "linux")]
        assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=admin_state, env=admin).returncode == 0
        assert vtap("flow", "add", "web", "--interface", "eth0", "--host", "host-a", "--direction", "in", state=admin_state, env=admin).returncode == 0
        # Long before the agent's 120 s resync: the store's watch woke it.
        assert len(wait_for(lambda: mirrors_on(machines["host-a"]))) == 1
        assert vtap("session", "delete", "web", state=admin_state, env=admin).returncode == 0
        assert wait_for(lambda: not mirrors_on(machines["host-a"]))
        assert vtap("session", "create", "db", "--to", "vxlan://192.0.2.2?vni=6", state=admin_state, env=admin).returncode == 0
        assert vtap("flow", "add", "db", "--interface", "eth0", "--host", "host-a", state=admin_state, env=admin).returncode == 0
        assert len(wait_for(lambda: mirrors_on(machines["host-a"]))) == 1
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
    # kill -9: no goodbye, the lease ends the listing.
    assert wait_for(lambda: not hosts(), seconds=10)
    # Restarted, it converges on what is there: the same one mirror, no duplicate, no orphan.
    agent = start_agent(url, machines["host-a"], str(tmp_path / "a/state.db"))
    try:
        assert wait_for(lambda: hosts())
        time.sleep(1)
        assert len(mirrors_on(machines["host-a"])) == 1
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    vtap("session", "delete", "db", state=admin_state, env=admin)


def leader(members):
    for member in members:
        try:
            status = member.status()
        except OSError:
            continue
        if status.get("leader") and status["leader"] == status["header"]["member_id"]:
            return member
    return None


def test_three_member_cluster_losing_its_leader_and_a_member_restart_lose_no_tap(etcd_cluster, vtap, machines, tmp_path):
    url = "etcd://" + ",".join(m.endpoint for m in etcd_cluster) + "/vtap/prod"
    admin = {"VTAP_STORE": url, "VTAP_HOST": "admin", "VTAP_LINUX_NETNS": machines["admin"]}
    admin_state = str(tmp_path / "admin/state.db")
    agent = start_agent(url, machines["host-a"], str(tmp_path / "a/state.db"))
    try:
        assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=admin_state, env=admin).returncode == 0
        assert vtap("flow", "add", "web", "--interface", "eth0", "--host", "host-a", state=admin_state, env=admin).returncode == 0
        assert len(wait_for(lambda: mirrors_on(machines["host-a"]))) == 1
        old = wait_for(lambda: leader(etcd_cluster))
        old.kill()  # kill -9 of the leader
        survivors = [m for m in etcd_cluster if m is not old]
        assert wait_for(lambda: leader(survivors), seconds=20)
        made = vtap("session", "create", "db", "--to", "vxlan://192.0.2.2?vni=6", state=admin_state, env=admin)
        assert made.returncode == 0, made.stderr
        assert vtap("flow", "add", "db", "--interface", "eth0", "--host", "host-a", state=admin_state, env=admin).returncode == 0
        assert len(wait_for(lambda: len(mirrors_on(machines["host-a"])) == 2 and mirrors_on(machines["host-a"]), seconds=20)) == 2
        old.start()  # the member comes back with its data and catches up
        time.sleep(2)
        assert len(mirrors_on(machines["host-a"])) == 2  # no tap lost, none doubled
        keys = old.keys("vtap/prod")
        assert {k.rsplit("/", 1)[1] for k in keys if "/sessions/" in k} == {"web", "db"}
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    for name in ("web", "db"):
        vtap("session", "delete", name, state=admin_state, env=admin)


def test_status_on_any_machine_shows_what_each_host_observed_and_stale_hosts(etcd, vtap, machines, tmp_path):
    url = etcd.url("vtap/prod")
    admin = {"VTAP_STORE": url, "VTAP_HOST": "admin", "VTAP_LINUX_NETNS": machines["admin"]}
    admin_state = str(tmp_path / "admin/state.db")

    def reported():
        rows = json.loads(vtap("-o", "json", "status", state=admin_state, env=admin).stdout or "[]")
        return {row["host"]: row for row in rows if row.get("host") == "host-a"}

    assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=admin_state, env=admin).returncode == 0
    assert vtap("flow", "add", "web", "--interface", "eth0", "--host", "host-a", "--direction", "in", state=admin_state, env=admin).returncode == 0
    host_a = machines["host-a"]
    for command in (["link", "add", "uplink", "type", "veth", "peer", "name", "uplinkpeer"], ["addr", "add", "192.0.2.10/24", "dev", "uplink"],
                    ["link", "set", "uplink", "up"], ["link", "set", "uplinkpeer", "up"]):
        subprocess.run(["ip", "-n", host_a, *command], check=True)  # a route to the VXLAN remote: copies can leave
    agent = start_agent(url, host_a, str(tmp_path / "a/state.db"))
    try:
        row = wait_for(lambda: reported().get("host-a", {}).get("state") == "active" and reported()["host-a"], seconds=15)
        assert row and row["flow"] == "web-1" and row["observed"] == row["desired"] == 1
        # Packets the host's mirror copied show up in the fleet's status (at the counters' modest rate).
        subprocess.run(["ip", "netns", "exec", machines["host-a"], "ip", "link", "set", "wire0", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", machines["host-a"], "ping", "-c", "3", "-i", "0.2", "-I", "wire0", "-W", "1", "192.0.2.77"], capture_output=True)
        assert wait_for(lambda: reported().get("host-a", {}).get("packets", 0) > 0, seconds=20)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
    assert wait_for(lambda: reported().get("host-a", {}).get("state", "").startswith("stale"), seconds=10)
    vtap("session", "delete", "web", state=admin_state, env=admin)
