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


def test_an_idle_watch_is_one_stream_and_a_stop_ends_it_at_once(etcd, tmp_path):
    """Agents of a large fleet sit idle most of the time: that must not be a new watch request (and
    connection) per agent every second; and stopping an agent must not wait for a silent stream to end."""
    url = etcd.url("vtap/idle")
    writer, streams, stop, woken, thread = _watching(url, tmp_path)
    try:
        assert woken.get(timeout=10) is None  # read
        time.sleep(4)
        assert len(streams) == 1  # four idle seconds, one watch stream
        change(writer, "a")
        assert woken.get(timeout=10)  # it still wakes on a change
    finally:
        stopped = time.monotonic()
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - stopped < 1.0


def test_changes_keep_coming_on_one_stream(etcd, tmp_path):
    """A change must not cost each of a hundred agents a new watch request and connection."""
    url = etcd.url("vtap/stream")
    writer, streams, stop, woken, thread = _watching(url, tmp_path)
    try:
        assert woken.get(timeout=10) is None  # read
        for name in ("a", "b", "c"):
            change(writer, name)
            assert [new.name for _, new in woken.get(timeout=5)] == [name]
        assert len(streams) == 1
    finally:
        stop.set()
        thread.join(timeout=10)


def _watching(url, tmp_path):
    """A writer, and a watcher's watch_desired running in a thread: (writer, the watch requests it sent, stop, what woke it, thread)."""
    watcher, writer = open_store(url, "linux", str(tmp_path / "w.db")), open_store(url, "linux", str(tmp_path / "v.db"))
    streams = []
    session = watcher._clients[0].session
    post = session.post
    session.post = lambda url, *a, **k: (streams.append(url) if url.endswith("/watch") else None) or post(url, *a, **k)
    stop, woken = threading.Event(), queue.Queue()
    thread = threading.Thread(target=lambda: [woken.put(c) for c in watcher.watch_desired(stop)], daemon=True)
    thread.start()
    return writer, streams, stop, woken, thread
