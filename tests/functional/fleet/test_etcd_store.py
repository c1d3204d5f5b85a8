"""The etcd store against a real etcd: same CLI, prefixes isolate fleets, changes are compare-and-swap."""

import json
import os
import subprocess
import sys

import uuid

import pytest

from vtap_core.client import Client
from vtap_core.errors import AlreadyExists
from vtap_core.model import TapSession
from vtap_core.stores import Conflict, open_store

IS_ROOT = os.geteuid() == 0


def test_cli_against_etcd_from_two_machines(etcd, vtap, netns, tmp_path):
    url = etcd.url("vtap/prod")
    made = vtap("--store", url, "session", "create", "web", "--to", "vxlan://192.0.2.1?vni=5", state=str(tmp_path / "a/state.db"), env={"VTAP_HOST": "admin-a", "VTAP_LINUX_NETNS": netns})
    assert made.returncode == 0, made.stderr
    # A second machine (its own local state dir) sees the same session, and adds to it.
    other = str(tmp_path / "b/state.db")
    env = {"VTAP_STORE": url, "VTAP_HOST": "admin-b", "VTAP_LINUX_NETNS": netns}
    listed = vtap("-o", "json", "session", "list", state=other, env=env)
    assert [s["name"] for s in json.loads(listed.stdout)] == ["web"]
    added = vtap("flow", "add", "web", "--vm", "6d0f3e0a-0d5c-4a53-9b39-2c9a1bde2a11", "--direction", "out", state=other, env={**env, "VTAP_DRIVER": "linux"})
    # The linux driver cannot source from a VM: refused with exit 2, and etcd holds what it held.
    assert added.returncode == 2 and len(added.stderr.strip().splitlines()) == 1
    keys = etcd.keys("vtap/prod")
    assert set(k for k in keys if "/desired/" in k) == {"/vtap/prod/desired/linux/generation", "/vtap/prod/desired/linux/sessions/web"}
    assert json.loads(keys["/vtap/prod/desired/linux/sessions/web"])["to"] == "vxlan://192.0.2.1:4789?vni=5"
    # Nothing was written to the local SQLite file: the fleet's state is in etcd only.
    assert not os.path.exists(tmp_path / "a/state.db")
    audit = json.loads(vtap("-o", "json", "audit", state=other, env=env).stdout)
    assert [(row["host"], row["command"].split(" --store ")[1]) for row in audit] == [("admin-a", f"{url} session create web --to 'vxlan://192.0.2.1?vni=5'")]


def test_two_prefixes_on_one_etcd_never_see_each_other(etcd, netns, tmp_path):
    state = str(tmp_path / "state.db")
    with Client(state=state, store=etcd.url("fleet/a"), netns=netns) as a, Client(state=state, store=etcd.url("fleet/b"), netns=netns) as b:
        a.create_session("web", to="vxlan://192.0.2.1?vni=5")
        b.create_session("db", to="vxlan://192.0.2.2?vni=6")
        assert [s.name for s in a.sessions()] == ["web"]
        assert [s.name for s in b.sessions()] == ["db"]
        assert [row["command"] for row in a.audit()] == ["sdk: session create web"]
        assert [row["command"] for row in b.audit()] == ["sdk: session create db"]
    assert all(k.startswith("/fleet/a/") for k in etcd.keys("fleet/a"))


def test_commit_is_refused_when_someone_else_committed_since_the_read(etcd, tmp_path):
    url = etcd.url("vtap/cas")
    first = open_store(url, "linux", str(tmp_path / "state.db"))
    second = open_store(url, "linux", str(tmp_path / "state.db"))
    first.snapshot()
    second.snapshot()
    with second.transaction():
        second.replace_all([TapSession("db", "vxlan://192.0.2.2?vni=6")], [])
        second.record("create db", {"created": "db"})
    before = etcd.keys("vtap/cas")
    with pytest.raises(Conflict):
        with first.transaction():  # read before second's commit: it would lose "db"
            first.replace_all([TapSession("web", "vxlan://192.0.2.1?vni=5")], [])
            first.record("create web", {"created": "web"})
    assert etcd.keys("vtap/cas") == before  # neither the state nor the audit row of the loser
    # The loser reads again and its change lands beside the other one.
    sessions, _ = first.snapshot()
    with first.transaction():
        first.replace_all(sessions + [TapSession("web", "vxlan://192.0.2.1?vni=5")], [])
    assert sorted(s.name for s in second.sessions()) == ["db", "web"]


CREATE_MANY = """
import sys
from vtap_core.client import Client
from vtap_core.errors import AlreadyExists
with Client(state=sys.argv[1], store=sys.argv[2], netns=sys.argv[6]) as vtap:
    for i in range(int(sys.argv[4])):
        vtap.create_session(f"{sys.argv[3]}-{i}", to=f"vxlan://192.0.2.1?vni={sys.argv[5]}{i}")
"""


@pytest.fixture
def four_machines():
    """Four network namespaces: four admin machines, each with its own local state."""
    if not IS_ROOT:
        pytest.skip("needs root: creates network namespaces")
    from pyroute2 import netns as pr_netns

    names = [f"vtapf-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    for name in names:
        pr_netns.create(name)
    try:
        yield names
    finally:
        for name in names:
            pr_netns.remove(name)


def test_admins_changing_at_the_same_moment_lose_nothing(etcd, four_machines, tmp_path):
    url = etcd.url("vtap/race")
    writers = [
        subprocess.Popen([sys.executable, "-c", CREATE_MANY, str(tmp_path / f"m{n}/state.db"), url, f"admin{n}", "8", str(n + 1), machine], stderr=subprocess.PIPE, text=True)
        for n, machine in enumerate(four_machines)
    ]
    for writer in writers:
        assert writer.wait(timeout=180) == 0, writer.stderr.read()
    with Client(state=str(tmp_path / "state.db"), store=url, netns=four_machines[0]) as vtap:
        assert len(vtap.sessions()) == 32
        assert len(vtap.audit()) == 32  # one row per change: no retry was recorded twice


def test_the_loser_of_a_race_whose_change_no_longer_makes_sense_is_refused_in_one_line(etcd, netns, tmp_path):
    url = etcd.url("vtap/dup")
    with Client(state=str(tmp_path / "a/state.db"), store=url, netns=netns) as first, Client(state=str(tmp_path / "b/state.db"), store=url, netns=netns) as second:
        original = second._change_once

        def interleaved(command, mutate, message):
            # `first` commits the same session between second's read and its commit.
            def racing(sessions, flows):
                if not first.sessions():
                    first.create_session("web", to="vxlan://192.0.2.1?vni=5")
                return mutate(sessions, flows)

            return original(command, racing, message)

        second._change_once = interleaved

        with pytest.raises(AlreadyExists, match="session 'web' already exists"):
            second.create_session("web", to="vxlan://192.0.2.9?vni=9")
        assert first.session("web").target.vni == 5
        assert [row["command"] for row in first.audit()] == ["sdk: session create web"]
