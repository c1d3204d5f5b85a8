"""Store faults: bad store URLs and TLS settings are usage errors; etcd down fails changes and keeps taps."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

BAD_STORES = [
    ({"--store": "etcd://"}, "is not HOST:PORT"),
    ({"--store": "etcd://127.0.0.1/vtap"}, "is not HOST:PORT"),
    ({"--store": "etcd://127.0.0.1:99999/vtap"}, "is not HOST:PORT"),
    ({"--store": "etcd://127.0.0.1:2379"}, "prefix"),
    ({"--store": "etcd://127.0.0.1:2379/../x"}, "prefix"),
    ({"--store": "etcd://127.0.0.1:2379/vtap?x=1"}, "no query"),
    ({"--store": "redis://127.0.0.1:6379/vtap"}, "unknown scheme 'redis'"),
    ({"--store": "127.0.0.1:2379/vtap"}, "is not a store URL"),
    ({"--store": "etcd://alice:s3cret-pw@127.0.0.1:2379/vtap"}, "no user or password in the store URL"),
    ({"--store": "sqlite://relative.db"}, "absolute path"),
    ({"--store": "etcds://127.0.0.1:2379/vtap", "VTAP_STORE_CA": "/nonexistent/ca.pem"}, "store ca: '/nonexistent/ca.pem' is not a readable file"),
    ({"--store": "etcd://127.0.0.1:2379/vtap", "VTAP_STORE_CA": "/etc/hostname"}, "use etcds://"),
    ({"--store": "etcds://127.0.0.1:2379/vtap", "VTAP_STORE_CERT": "/etc/hostname"}, "needs both cert and key"),
    ({"--store": "etcds://127.0.0.1:2379/vtap", "VTAP_STORE_INSECURE": "maybe"}, "not true or false"),
    ({"--store": "etcd://127.0.0.1:2379/vtap", "VTAP_STORE_PASSWORD": "s3cret-pw"}, "a password needs a user"),
]


@pytest.mark.parametrize("given,why", BAD_STORES, ids=[g["--store"] + " " + " ".join(k for k in g if k != "--store") for g, _ in BAD_STORES])
def test_bad_store_urls_and_tls_settings_exit_2_in_one_line_and_change_nothing(etcd, vtap, tmp_path, given, why):
    store = given["--store"].replace("127.0.0.1:2379", etcd.endpoint)
    env = {k: v for k, v in given.items() if k.startswith("VTAP_")}
    before = etcd.keys()
    result = vtap("--store", store, "session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=str(tmp_path / "m/state.db"), env=env)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and why in result.stderr, result.stderr
    assert "s3cret-pw" not in result.stderr
    assert not os.path.exists(tmp_path / "m")  # no local store, no state dir
    assert etcd.keys() == before


def test_cli_change_while_etcd_is_down_exits_1_and_changes_nothing(etcd, vtap, netns, tmp_path):
    env = {"VTAP_STORE": etcd.url("vtap/prod"), "VTAP_LINUX_NETNS": netns}
    state = str(tmp_path / "state.db")
    assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=state, env=env).returncode == 0
    kernel = kernel_of(netns)
    etcd.kill()  # a real kill -9 of the only member
    for command in (("session", "create", "db", "--to", "vxlan://192.0.2.2?vni=6"), ("session", "delete", "web"), ("session", "disable", "web")):
        result = vtap(*command, state=state, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "etcd store unreachable" in result.stderr, result.stderr
    assert kernel_of(netns) == kernel  # the platform is untouched too
    etcd.start()
    listed = json.loads(vtap("-o", "json", "session", "list", state=state, env=env).stdout)
    assert [(s["name"], s["enabled"]) for s in listed] == [("web", True)]
    assert len(json.loads(vtap("-o", "json", "audit", state=state, env=env).stdout)) == 1


def test_follower_keeps_every_tap_while_desired_state_cannot_be_read(etcd, vtap, netns, tmp_path):
    subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    env = {"VTAP_STORE": etcd.url("vtap/prod"), "VTAP_LINUX_NETNS": netns}
    state = str(tmp_path / "state.db")
    assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=state, env=env).returncode == 0
    assert vtap("flow", "add", "web", "--interface", "eth0", "--direction", "in", state=state, env=env).returncode == 0
    kernel = kernel_of(netns)
    assert kernel["eth0/ingress"], "the flow's filter is in the kernel"
    etcd.kill()
    assert vtap("follow", "--once", state=state, env=env).returncode == 1  # a resync that cannot read does nothing
    follower = subprocess.Popen(
        [sys.executable, "-m", "vtap_cli.main", "--state", state, "follow", "--interval", "0.3"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}, **env}, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(3)  # several resyncs against a dead store
        assert kernel_of(netns) == kernel
        etcd.start()
        time.sleep(2)
        assert kernel_of(netns) == kernel  # back: the same desired state, nothing to change
    finally:
        follower.send_signal(signal.SIGTERM)
        _, log = follower.communicate(timeout=30)
    assert "etcd store unreachable" in log


def kernel_of(netns: str) -> dict:
    """Links (name, kind) and the tc filters on each (handle, mirror target, vtap's cookie), read with iproute2."""
    links = json.loads(subprocess.run(["ip", "-n", netns, "-j", "-d", "link", "show"], capture_output=True, text=True, check=True).stdout)
    state = {"links": sorted((l["ifname"], l.get("linkinfo", {}).get("info_kind")) for l in links)}
    for link in links:
        for hook in ("ingress", "egress"):
            out = subprocess.run(["tc", "-n", netns, "-j", "filter", "show", "dev", link["ifname"], hook], capture_output=True, text=True)
            filters = json.loads(out.stdout or "[]") if out.returncode == 0 else []
            state[f"{link['ifname']}/{hook}"] = sorted(
                (f["pref"], f["options"].get("handle"), a.get("to_dev"), a.get("cookie"))
                for f in filters if "options" in f for a in f["options"].get("actions", [])
            )
    return state


def test_etcds_verifies_the_server_against_the_given_ca_and_refuses_without_it(etcd_tls, vtap, netns, tmp_path):
    server, ca = etcd_tls
    url = f"etcds://{server.endpoint}/vtap/prod"
    env = {"VTAP_STORE": url, "VTAP_LINUX_NETNS": netns}
    state = str(tmp_path / "state.db")
    # The system's CAs do not know this server: verification fails, nothing is written.
    refused = vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=state, env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    env["VTAP_STORE_CA"] = ca
    listed = vtap("-o", "json", "session", "list", state=state, env=env)
    assert json.loads(listed.stdout or "null") == [], listed.stderr
    made = vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=state, env=env)
    assert made.returncode == 0, made.stderr
    assert [s["name"] for s in json.loads(vtap("-o", "json", "session", "list", state=state, env=env).stdout)] == ["web"]
