"""Desired state and the audit log, in one embedded SQLite file.

Rows are kept per driver: the same store can hold a linux session and a kvm
session of the same name. The audit log is append-only (no code path updates
or deletes its rows). The file is created with mode 0600: it says what is
being watched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import sqlite3

from vtap_core.errors import AlreadyExists, NotFound
from vtap_core.model import TapFlow, TapSession
from vtap_core.safefile import open_private, private_dirs

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    driver TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (driver, name));
CREATE TABLE IF NOT EXISTS flows (
    driver TEXT NOT NULL, name TEXT NOT NULL, session TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (driver, name));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, user TEXT NOT NULL,
    driver TEXT NOT NULL, command TEXT NOT NULL, change TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def default_path() -> str:
    """VTAP_STATE, else /var/lib/vtap/state.db as root, else the XDG state dir."""
    if os.environ.get("VTAP_STATE"):
        return os.environ["VTAP_STATE"]
    if os.geteuid() == 0:
        return "/var/lib/vtap/state.db"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "vtap", "state.db")


class Store:
    def __init__(self, path: str | None = None, driver: str = "linux"):
        self.path = os.path.abspath(path or default_path())
        self.driver = driver
        private_dirs(os.path.dirname(self.path))
        os.close(open_private(self.path, os.O_CREAT | os.O_WRONLY))  # 0600, ours, not through a link
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    @property
    def state_dir(self) -> str:
        return os.path.dirname(self.path)

    def close(self):
        self.db.close()

    @contextlib.contextmanager
    def transaction(self):
        """One all-or-nothing unit; writers are serialized across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # sessions -------------------------------------------------------------

    def sessions(self) -> list[TapSession]:
        rows = self.db.execute("SELECT data FROM sessions WHERE driver=? ORDER BY name", (self.driver,))
        return [TapSession.from_dict(json.loads(data)) for (data,) in rows]

    def session(self, name: str) -> TapSession:
        row = self.db.execute("SELECT data FROM sessions WHERE driver=? AND name=?", (self.driver, name)).fetchone()
        if row is None:
            raise NotFound(f"session {name!r} does not exist")
        return TapSession.from_dict(json.loads(row[0]))

    def has_session(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sessions WHERE driver=? AND name=?", (self.driver, name)).fetchone() is not None

    def put_session(self, session: TapSession, replace: bool = False):
        if not replace and self.has_session(session.name):
            raise AlreadyExists(f"session {session.name!r} already exists")
        self.db.execute(
            "INSERT OR REPLACE INTO sessions (driver, name, data) VALUES (?, ?, ?)",
            (self.driver, session.name, json.dumps(session.to_dict())),
        )

    # flows ----------------------------------------------------------------

    def flows(self, session: str | None = None) -> list[TapFlow]:
        if session is None:
            rows = self.db.execute("SELECT data FROM flows WHERE driver=? ORDER BY session, name", (self.driver,))
        else:
            rows = self.db.execute("SELECT data FROM flows WHERE driver=? AND session=? ORDER BY name", (self.driver, session))
        return [TapFlow.from_dict(json.loads(data)) for (data,) in rows]

    def has_flow(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM flows WHERE driver=? AND name=?", (self.driver, name)).fetchone() is not None

    def put_flow(self, flow: TapFlow, replace: bool = False):
        self.session(flow.session)
        if not replace and self.has_flow(flow.name):
            raise AlreadyExists(f"flow {flow.name!r} already exists")
        self.db.execute(
            "INSERT OR REPLACE INTO flows (driver, name, session, data) VALUES (?, ?, ?, ?)",
            (self.driver, flow.name, flow.session, json.dumps(flow.to_dict())),
        )

    def snapshot(self) -> tuple[list[TapSession], list[TapFlow]]:
        return self.sessions(), self.flows()

    def replace_all(self, sessions: list[TapSession], flows: list[TapFlow]):
        """This driver's whole desired state becomes exactly these (call inside a transaction)."""
        self.db.execute("DELETE FROM flows WHERE driver=?", (self.driver,))
        self.db.execute("DELETE FROM sessions WHERE driver=?", (self.driver,))
        for session in sessions:
            self.put_session(session)
        for flow in flows:
            self.put_flow(flow)

    # audit ----------------------------------------------------------------

    def record(self, command: str, change: dict, user: str | None = None):
        self.db.execute(
            "INSERT INTO audit (time, user, driver, command, change) VALUES (?, ?, ?, ?, ?)",
            (
                dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                user or current_user(),
                self.driver,
                command,
                json.dumps(change, sort_keys=True),
            ),
        )

    def audit(self, all_drivers: bool = True) -> list[dict]:
        query = "SELECT id, time, user, driver, command, change FROM audit"
        args: tuple = ()
        if not all_drivers:
            query += " WHERE driver=?"
            args = (self.driver,)
        rows = self.db.execute(query + " ORDER BY id", args)
        return [
            {"id": i, "time": t, "user": u, "driver": d, "command": c, "change": json.loads(ch)}
            for i, t, u, d, c, ch in rows
        ]


def current_user() -> str:
    """The OS user, as the person behind sudo when there is one."""
    try:
        name = getpass.getuser()
    except Exception:
        name = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (as {name})" if sudo and sudo != name else name
