"""The store's watch, which wakes agents: resumes after etcd comes back, re-lists after compaction."""

import json
import queue
import threading
import time
import urllib.request

from vtap_core.model import TapSession
from vtap_core.stores import open_store


def change(store, name):
    sessions, flows = store.snapshot()
    with store.transaction():
        store.replace_all(sessions + [TapSession(name, "vxlan://192.0.2.1?vni=5")], flows)


def test_watch_wakes_on_changes_and_resumes_after_etcd_returns(etcd, tmp_path):
    url = etcd.url("vtap/w")
    watcher, writer = open_store(url, "linux", str(tmp_path / "s.db")), open_store(url, "linux", str(tmp_path / "s.db"))
    stop, woken = threading.Event(), queue.Queue()
    thread = threading.Thread(target=lambda: [woken.put(1) for _ in watcher.watch_desired(stop)], daemon=True)
    thread.start()
    try:
        change(writer, "a")
        assert woken.get(timeout=10)
        etcd.kill()
        etcd.start()
        time.sleep(3)  # it reconnects (backoff at most a few seconds here)
        while not woken.empty():  # wake-ups while it was away (the caller resyncs; nothing is removed)
            woken.get()
        change(writer, "b")
        assert woken.get(timeout=15)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_compacted_revision_makes_the_watcher_relist(etcd, tmp_path):
    store = open_store(etcd.url("vtap/c"), "linux", str(tmp_path / "s.db"))
    for name in ("a", "b", "c"):
        change(store, name)
    revision = int(json.load(urllib.request.urlopen(f"http://{etcd.endpoint}/v3/kv/range", b'{"key": "AA=="}', timeout=5))["header"]["revision"])
    urllib.request.urlopen(f"http://{etcd.endpoint}/v3/kv/compaction", json.dumps({"revision": revision}).encode(), timeout=5).read()
    changed, resume = store._watch_once(1)  # the revision an agent saw before a long outage
    assert changed  # "re-list everything"
    assert resume == revision - 1  # and watch again from the oldest revision etcd still has
