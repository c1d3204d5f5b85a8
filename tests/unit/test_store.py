"""The store: 0600, per-driver rows, append-only audit log."""

import os
import sqlite3
import stat

import pytest

from vtap_core.errors import AlreadyExists, NotFound
from vtap_core.model import Source, TapFlow, TapSession
from vtap_core.store import Store


def test_store_file_is_private_and_round_trips(state_path):
    store = Store(state_path, driver="linux")
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
    session = TapSession("web", "vxlan://192.0.2.1?vni=5", sample=4)
    store.put_session(session)
    store.put_flow(TapFlow("web-1", "web", Source(interface="eth0"), "in", "tcp"))
    assert store.sessions() == [session]
    assert store.flows("web")[0].filter == "tcp"
    with pytest.raises(AlreadyExists):
        store.put_session(session)
    with pytest.raises(NotFound):
        store.put_flow(TapFlow("x-1", "nope", Source(interface="eth0")))
    other = Store(state_path, driver="kvm")
    assert other.sessions() == []


def test_audit_log_is_append_only(state_path):
    store = Store(state_path)
    store.record("session create web", {"created": "web"}, user="alice")
    rows = store.audit()
    assert rows[0]["user"] == "alice" and rows[0]["change"] == {"created": "web"}
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("UPDATE audit SET user='mallory'")
    assert len(store.audit()) == 1
