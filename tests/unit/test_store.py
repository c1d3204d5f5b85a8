"""The store: 0600, per-driver rows, append-only audit log; it refuses to guess."""

import os
import sqlite3
import stat

import pytest

from vtap_core.errors import AlreadyExists, NotFound, OperationFailed
from vtap_core.model import Source, TapFlow, TapSession
from vtap_core.store import Store, StoreChanged


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


def test_a_zero_length_store_is_refused_with_its_path(state_path):
    open(state_path, "w").close()
    with pytest.raises(OperationFailed, match="empty \\(0 bytes\\).*restore it from a backup") as caught:
        Store(state_path)
    assert state_path in str(caught.value)
    assert os.path.getsize(state_path) == 0


def test_a_new_store_is_never_seen_empty(state_path):
    Store(state_path).close()
    assert os.path.getsize(state_path) > 0
    assert sorted(os.listdir(os.path.dirname(state_path))) == ["vtap.db"]


def test_a_newer_schema_is_read_but_refused_read_write(state_path):
    store = Store(state_path)
    store.put_session(TapSession("web", "port:mon0"))
    store.close()
    with sqlite3.connect(state_path) as db:
        db.execute("PRAGMA user_version=7")
    store = Store(state_path)
    assert [s.name for s in store.sessions()] == ["web"]
    with pytest.raises(OperationFailed, match="schema version 7"):
        with store.transaction():
            store.replace_all([], [])
    assert [s.name for s in store.sessions()] == ["web"]


def test_a_damaged_store_names_its_path_and_what_to_do(state_path):
    with open(state_path, "wb") as f:
        f.write(b"\x00garbage" * 512)
    with pytest.raises(OperationFailed, match="is damaged.*backup.*move it away") as caught:
        Store(state_path)
    assert state_path in str(caught.value)


@pytest.mark.parametrize("how", ["replaced", "deleted", "emptied", "upgraded"])
def test_a_store_replaced_deleted_or_emptied_is_noticed(state_path, tmp_path, how):
    store = Store(state_path)
    store.check_identity()
    if how == "replaced":
        Store(str(tmp_path / "other.db")).close()
        os.rename(tmp_path / "other.db", state_path)
    elif how == "deleted":
        os.unlink(state_path)
    elif how == "emptied":
        os.truncate(state_path, 0)
    else:
        with sqlite3.connect(state_path) as db:
            db.execute("PRAGMA user_version=2")
    with pytest.raises(StoreChanged, match=f"was {how}"):
        store.check_identity()
