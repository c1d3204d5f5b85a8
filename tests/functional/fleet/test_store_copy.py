"""An agent's store keeps the desired state from its watch: a change costs it no read of the whole
prefix, and a change that only another host realizes costs it no reconcile either."""

import os
import subprocess
import threading
import time

import pytest

from vtap_core.agent import Agent
from vtap_core.client import Client
from vtap_core.model import Source, TapFlow, TapSession
from vtap_core.stores import open_store

IS_ROOT = os.geteuid() == 0


def counting(store) -> dict:
    """Counts the store's etcd requests by path (the real requests still go to etcd)."""
    counts: dict = {}
    post = store._post

    def counted(path, payload):
        counts[path] = counts.get(path, 0) + 1
        return post(path, payload)

    store._post = counted
    return counts


def test_the_watch_keeps_a_copy_that_snapshots_read_without_a_request(etcd, tmp_path):
    url = etcd.url("vtap/copy")
    watcher, writer = open_store(url, "linux", str(tmp_path / "w.db")), open_store(url, "linux", str(tmp_path / "v.db"))
    stop, seen = threading.Event(), []
    thread = threading.Thread(target=lambda: [seen.append(c) for c in watcher.watch_desired(stop) if c is not None], daemon=True)
    thread.start()
    try:
        time.sleep(1)
        web = TapSession("web", "vxlan://192.0.2.1?vni=5")
        flow = TapFlow("web-1", "web", Source(interface="eth0"), host="host-a")
        writer.snapshot()
        with writer.transaction():
            writer.replace_all([web], [flow])
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(seen[0], key=str) == sorted([(None, web), (None, flow)], key=str)
        counts = counting(watcher)
        assert watcher.snapshot() == ([web], [flow])
        assert counts == {}  # read from the copy
        with writer.transaction():
            writer.replace_all([web], [])
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen[1] == [(flow, None)]
        assert watcher.snapshot() == ([web], []) and counts == {}
        # The copy guards a change like a read does: a stale one is refused, not committed.
        with watcher.transaction():
            watcher.replace_all([web, TapSession("db", "vxlan://192.0.2.2?vni=6")], [])
        assert [s.name for s in writer.snapshot()[0]] == ["db", "web"]
    finally:
        stop.set()
        thread.join(timeout=10)
    assert watcher._copy is None  # no watch, no copy: reads go to etcd again
    etcd.kill()
    with pytest.raises(Exception, match="unreachable"):
        watcher.snapshot()
    etcd.start()


def test_an_agent_reconciles_only_for_changes_it_realizes(etcd, netns, tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root: tc in a network namespace")
    subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    url = etcd.url("vtap/hints")
    admin = Client(state=str(tmp_path / "admin/state.db"), store=url, host="admin", netns=netns)
    client = Client(state=str(tmp_path / "b/state.db"), store=url, host="host-b", netns=netns)
    agent = Agent(client, "host-b", interval=300, ttl=5)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    reconciles = []
    reconcile = client.reconcile
    client.reconcile = lambda scope=None: reconciles.append(scope) or reconcile(scope)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not reconciles and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
        admin.create_session("web", to="vxlan://192.0.2.1?vni=5")
        time.sleep(1.5)
        started = len(reconciles)
        assert started >= 2  # the start, and the session (a session may concern every host)
        admin.add_flow("web", interface="eth0", host="host-a", name="web-a")
        time.sleep(1.5)
        assert client.store._copy and any("web-a" in key for key in client.store._copy)  # host-b heard it...
        assert len(reconciles) == started  # ...and had nothing to do
        admin.add_flow("web", interface="eth0", host="host-b", name="web-b")
        deadline = time.monotonic() + 5
        while len(reconciles) == started and time.monotonic() < deadline:
            time.sleep(0.05)
        # Its own flow wakes it (once, or twice: the VXLAN device it then makes is a netlink event here too).
        assert started + 1 <= len(reconciles) <= started + 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and {r.flow: r.state for r in client.status()}.get("web-b") not in ("active", "degraded"):
            time.sleep(0.1)  # that reconcile is under way
        rows = {r.flow: r.state for r in client.status()}
        assert rows["web-a"] == "inactive" and rows["web-b"] in ("active", "degraded")  # degraded: no route to the VXLAN remote here
    finally:
        stop.set()
        thread.join(timeout=15)
        admin.delete_session("web")
        admin.close()
        client.close()


def test_a_change_reads_the_whole_desired_state_only_when_another_writer_moved_it(etcd, tmp_path, monkeypatch):
    """An admin's second change over many flows costs one small request (the generation), not a
    range of every flow parsed again; after another writer's change it re-reads, parsing only what changed."""
    url = etcd.url("vtap/view")
    admin, other = open_store(url, "linux", str(tmp_path / "a.db")), open_store(url, "linux", str(tmp_path / "o.db"))
    web = TapSession("web", "vxlan://192.0.2.1?vni=5")
    flows = [TapFlow(f"f{i:03d}", "web", Source(interface=f"eth{i}"), host="host-a") for i in range(100)]
    admin.snapshot()
    with admin.transaction():
        admin.replace_all([web], flows)
    parsed = []
    from_dict = TapFlow.from_dict
    monkeypatch.setattr(TapFlow, "from_dict", staticmethod(lambda data: parsed.append(data["name"]) or from_dict(data)))
    counts, payloads = counting(admin), []
    post = admin._post
    admin._post = lambda path, payload: payloads.append(payload) or post(path, payload)
    assert admin.snapshot() == ([web], flows)
    assert counts == {"/kv/range": 1} and "range_end" not in payloads[0]  # the generation key alone
    added = TapFlow("new", "web", Source(interface="eth9"), host="host-a")
    with admin.transaction():
        admin.replace_all([web], flows + [added])
    assert admin.snapshot()[1] == sorted(flows + [added], key=lambda f: f.name) and parsed == []
    other.snapshot()
    with other.transaction():
        other.replace_all([web], flows)  # another machine removes "new"
    counts.clear()
    parsed.clear()  # (the other machine's own read)
    assert admin.snapshot() == ([web], flows)
    assert counts == {"/kv/range": 2} and parsed == []  # read again, every value as it was: nothing parsed
    # The view guards a change like a read does: a stale one is refused.
    other.snapshot()
    with other.transaction():
        other.replace_all([web], flows[:1])
    with pytest.raises(Exception, match="changed while"):
        with admin.transaction():
            admin.replace_all([web], flows + [added])
    assert admin.snapshot()[1] == flows[:1]
