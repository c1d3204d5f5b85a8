"""Interface flows name their host: each host's agent realizes its own, and checks its own devices."""

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from fleetlib import mirrors_on, wait_for

IS_ROOT = os.geteuid() == 0
FRAMES = 25
SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
frame = bytes.fromhex("020000000001" "020000000002" "88b5") + b"vtap fleet test".ljust(60, b".")
for _ in range(int(sys.argv[2])):
    s.send(frame)
"""


def ip(netns, *args):
    subprocess.run(["ip", "-n", netns, *args], check=True)


@pytest.fixture
def fleet():
    """host-a (eth0 and a monitor port mon0), host-b (eth0 only) and an admin machine with neither."""
    if not IS_ROOT:
        pytest.skip("needs root: creates network namespaces")
    names = {role: f"vtapf-{uuid.uuid4().hex[:8]}" for role in ("host-a", "host-b", "admin")}
    for role, name in names.items():
        subprocess.run(["ip", "netns", "add", name], check=True)
        # No IPv6 router solicitations or MLD reports from the links coming up: only the test's frames are counted.
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        if role == "admin":
            continue
        ip(name, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0")
        for device in ("eth0", "wire0"):
            ip(name, "link", "set", device, "up")
    ip(names["host-a"], "link", "add", "mon0", "type", "veth", "peer", "name", "mon0p")
    for device in ("mon0", "mon0p"):
        ip(names["host-a"], "link", "set", device, "up")
    try:
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


def rx_packets(netns: str, device: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]["stats64"]["rx"]["packets"]


def start_agent(url, host, netns, state):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
    env.update({"VTAP_STORE": url, "VTAP_LINUX_NETNS": netns})
    command = [sys.executable, "-m", "vtap_cli.main", "--state", state, "--host", host, "agent", "--interval", "120", "--ttl", "3"]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def test_each_host_realizes_its_own_interface_flows_and_reports_its_own_verdict(etcd, vtap, fleet, tmp_path):
    url = etcd.url("vtap/prod")
    admin = {"VTAP_STORE": url, "VTAP_HOST": "admin", "VTAP_LINUX_NETNS": fleet["admin"]}
    admin_state = str(tmp_path / "admin/state.db")
    agents = [start_agent(url, host, fleet[host], str(tmp_path / host / "state.db")) for host in ("host-a", "host-b")]
    try:
        # The admin machine has neither mon0 nor eth0: those checks are the owning hosts' to make.
        made = vtap("session", "create", "web", "--to", "port:mon0", state=admin_state, env=admin)
        assert made.returncode == 0, made.stderr
        added = vtap("flow", "add", "web", "--interface", "eth0", "--host", "host-a", "--direction", "in", "--name", "web-a", state=admin_state, env=admin)
        assert added.returncode == 0, added.stderr
        # host-b's flow comes from a file, with the `host:` key.
        document = tmp_path / "fleet.yaml"
        document.write_text(
            "sessions:\n- name: web\n  to: port:mon0\n  flows:\n"
            "  - {name: web-a, interface: eth0, host: host-a, direction: in}\n"
            "  - {name: web-b, interface: eth0, host: host-b, direction: in}\n"
        )
        applied = vtap("apply", "-f", str(document), state=admin_state, env=admin)
        assert applied.returncode == 0, applied.stderr
        stored = {k.rsplit("/", 1)[1]: json.loads(v) for k, v in etcd.keys("vtap/prod").items() if "/flows/" in k}
        assert {name: flow["host"] for name, flow in stored.items()} == {"web-a": "host-a", "web-b": "host-b"}

        # host-a mirrors its eth0 into its mon0; nobody else mirrors anything.
        assert wait_for(lambda: mirrors_on(fleet["host-a"])) == ["mon0"]
        assert mirrors_on(fleet["host-b"]) == []
        before = rx_packets(fleet["host-a"], "mon0p")
        subprocess.run(["ip", "netns", "exec", fleet["host-a"], sys.executable, "-c", SEND, "wire0", str(FRAMES)], check=True)
        assert wait_for(lambda: rx_packets(fleet["host-a"], "mon0p") - before >= FRAMES, seconds=5)
        assert rx_packets(fleet["host-a"], "mon0p") - before == FRAMES

        # host-b has no mon0: its agent's verdict, shown by status on the admin machine.
        def rows():
            listed = vtap("-o", "json", "status", state=admin_state, env=admin)
            return {(r["flow"], r["host"]): r for r in json.loads(listed.stdout or "[]")}

        seen = wait_for(lambda: (lambda r: ("web-b", "host-b") in r and ("web-a", "host-a") in r and r)(rows()))
        assert seen[("web-a", "host-a")]["state"] == "active"
        assert seen[("web-b", "host-b")]["state"] != "active"
        assert "mon0" in seen[("web-b", "host-b")]["problem"] and "does not exist" in seen[("web-b", "host-b")]["problem"]
        assert ("web-b", "host-a") not in seen and ("web-a", "host-b") not in seen  # a host reports only its own flows
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=30)
    assert vtap("session", "delete", "web", state=admin_state, env=admin).returncode == 0


def test_a_one_host_store_keeps_refusing_what_this_host_cannot_do(vtap, netns, tmp_path):
    subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0"], check=True)
    env = {"VTAP_LINUX_NETNS": netns, "VTAP_HOST": "here"}
    state = str(tmp_path / "state.db")
    assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=state, env=env).returncode == 0
    audit = vtap("-o", "json", "audit", state=state, env=env).stdout
    for args in (
        ("session", "create", "mon", "--to", "port:mon0"),  # no such port here
        ("flow", "add", "web", "--interface", "eth9"),  # no such interface here
        ("flow", "add", "web", "--interface", "eth0", "--host", "elsewhere"),  # one host's store: no other host
        ("flow", "add", "web", "--vm", "vm1", "--host", "here"),  # a VM's host is wherever it runs
    ):
        refused = vtap(*args, state=state, env=env)
        assert refused.returncode == 2, (args, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
    assert vtap("-o", "json", "audit", state=state, env=env).stdout == audit  # nothing changed in the store
    assert json.loads(vtap("-o", "json", "flow", "list", state=state, env=env).stdout) == []
    assert mirrors_on(netns) == []
    # This host's own name is fine, and stored as no host at all: every flow of this store is this host's.
    assert vtap("flow", "add", "web", "--interface", "eth0", "--host", "here", state=state, env=env).returncode == 0
    assert "host" not in json.loads(vtap("-o", "json", "flow", "list", state=state, env=env).stdout)[0]
    vtap("session", "delete", "web", state=state, env=env)
