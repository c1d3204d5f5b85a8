"""An etcd with authentication on: the user and password come from the environment or the config
file, never argv, never a log line or audit row; a wrong or missing password is one line, exit 2;
an agent outlives its auth token (etcd's --auth-token-ttl)."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from fleetlib import mirrors_on, wait_for

IS_ROOT = os.geteuid() == 0


def gateway(etcd, path, body):
    request = urllib.request.Request(f"http://{etcd.endpoint}/v3{path}", json.dumps(body).encode(), method="POST")
    return json.load(urllib.request.urlopen(request, timeout=5))


@pytest.fixture
def etcd_auth(etcd):
    """The test's etcd with a root user and authentication enabled (what `etcdctl user add root; etcdctl auth enable` do);
    auth tokens live 2 s, so a long-running agent has to renew its token."""
    etcd.kill()
    etcd.extra = ["--auth-token-ttl", "2"]
    etcd.start()
    password = "pw-" + secrets.token_hex(8)
    gateway(etcd, "/auth/user/add", {"name": "root", "password": password})
    gateway(etcd, "/auth/role/add", {"name": "root"})
    gateway(etcd, "/auth/user/grant", {"user": "root", "role": "root"})
    gateway(etcd, "/auth/enable", {})
    return etcd, password


def test_wrong_or_missing_credentials_are_one_line_exit_2_and_change_nothing(etcd_auth, vtap, netns, tmp_path):
    etcd, password = etcd_auth
    state = str(tmp_path / "state.db")
    base = {"VTAP_STORE": etcd.url("vtap/prod"), "VTAP_LINUX_NETNS": netns}
    good = {**base, "VTAP_STORE_USER": "root", "VTAP_STORE_PASSWORD": password}
    assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=state, env=good).returncode == 0
    audit = vtap("-o", "json", "audit", state=state, env=good).stdout
    wrong = "nope-" + secrets.token_hex(4)
    for env, says in (
        (base, "VTAP_STORE_USER"),
        ({**base, "VTAP_STORE_USER": "root", "VTAP_STORE_PASSWORD": wrong}, "authentication failed"),
        ({**base, "VTAP_STORE_USER": "nobody", "VTAP_STORE_PASSWORD": password}, "authentication failed"),
    ):
        for args in (("session", "list"), ("session", "create", "db", "--to", "vxlan://192.0.2.2?vni=6")):
            refused = vtap(*args, state=state, env=env)
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.count("\n") == 1 and says in refused.stderr, refused.stderr
            assert wrong not in refused.stderr and password not in refused.stderr
    assert vtap("-o", "json", "audit", state=state, env=good).stdout == audit  # nothing was changed
    assert [s["name"] for s in json.loads(vtap("-o", "json", "session", "list", state=state, env=good).stdout)] == ["web"]
    # The config file's [store] section works the same (and is how a password stays out of the environment too).
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\nuser = "root"\npassword = "{password}"\n')
    listed = vtap("-o", "json", "session", "list", state=state, env={**base, "VTAP_CONFIG": str(config)})
    assert listed.returncode == 0 and [s["name"] for s in json.loads(listed.stdout)] == ["web"], listed.stderr


def test_an_agent_with_credentials_outlives_its_token_and_shows_the_password_nowhere(etcd_auth, vtap, netns, tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root: tc in a network namespace")
    etcd, password = etcd_auth
    subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    url = etcd.url("vtap/prod")
    env = {"VTAP_STORE": url, "VTAP_STORE_USER": "root", "VTAP_STORE_PASSWORD": password, "VTAP_LINUX_NETNS": netns, "VTAP_HOST": "host-a"}
    admin_state = str(tmp_path / "admin/state.db")
    agent_env = {**{k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}, **env}
    agent = subprocess.Popen([sys.executable, "-m", "vtap_cli.main", "--state", str(tmp_path / "a/state.db"), "agent", "--interval", "120", "--ttl", "3"],
                             env=agent_env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: json.loads(vtap("-o", "json", "hosts", state=admin_state, env=env).stdout or "[]"))
        argv = open(f"/proc/{agent.pid}/cmdline", "rb").read().decode()
        listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert password not in argv and password not in listing
        time.sleep(4)  # the agent's first token is gone: its watch and its heartbeat must get a new one
        assert vtap("session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=admin_state, env=env).returncode == 0
        assert vtap("flow", "add", "web", "--interface", "eth0", "--host", "host-a", state=admin_state, env=env).returncode == 0
        assert wait_for(lambda: mirrors_on(netns), seconds=5), "the agent heard the change (long before its 120 s resync)"
        time.sleep(3)
        hosts = json.loads(vtap("-o", "json", "hosts", state=admin_state, env=env).stdout)
        assert [h["host"] for h in hosts] == ["host-a"]  # its lease is still renewed
    finally:
        agent.send_signal(signal.SIGTERM)
        _, log = agent.communicate(timeout=30)
    assert password not in log
    audit = vtap("-o", "json", "audit", state=admin_state, env=env).stdout
    assert "web" in audit and password not in audit
    vtap("session", "delete", "web", state=admin_state, env=env)
