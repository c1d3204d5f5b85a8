"""Desired state and the audit log, in one embedded SQLite file.

Rows are kept per driver: the same store can hold a linux session and a kvm
session of the same name. The audit log is append-only (no code path updates
or deletes its rows). The file is created with mode 0600: it says what is
being watched.

The store refuses to guess. A zero-length or damaged file is not "no sessions"
(a follower would remove every mirror): it is refused with its path and what
to do. A store written by a newer vtap (PRAGMA user_version above ours) or one
on a read-only file system is opened read-only: listings, status and audit
work, changes are refused. The file's identity (device, inode) is kept, so a
store replaced or deleted under a running process is noticed, not fought over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import socket
import sqlite3
import urllib.parse

from vtap_core.errors import AlreadyExists, NotFound, OperationFailed
from vtap_core.model import TapFlow, TapSession
from vtap_core.safefile import open_private, private_dirs

SCHEMA_VERSION = 1  # PRAGMA user_version; 0 is a store from before versions, the same as 1
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


class StoreChanged(OperationFailed):
    """The store file was replaced, deleted or emptied while this process had it open."""


class Store:
    def __init__(self, path: str | None = None, driver: str = "linux"):
        self.path = os.path.abspath(path or default_path())
        self.driver = driver
        private_dirs(os.path.dirname(self.path))
        if not os.path.lexists(self.path):
            self._create()
        self.read_only = _why_read_only(self.path)  # "" when this store may be written
        # 0600, ours, not reached through a link (an existing file of ours is made 0600).
        os.close(open_private(self.path, os.O_RDONLY if self.read_only else os.O_RDWR))
        self.identity = self._identity()
        try:
            self.db = self._connect(read_only=True)  # the version first, without writing anything
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self.read_only = (
                    f"store {self.path} has schema version {version} and this vtap knows only up to {SCHEMA_VERSION}: "
                    "it was written by a newer vtap; use that one (it is only read here, so nothing it holds is dropped)"
                )
            elif not self.read_only:
                self.db.close()
                self.db = self._connect(read_only=False)
                self.db.executescript(SCHEMA)
                if version < SCHEMA_VERSION:
                    self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:  # the file is fine, the system is not (disk full, I/O error)
            raise OperationFailed(f"store {self.path}: cannot open ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise OperationFailed(
                f"store {self.path} is damaged ({exc}): restore it from a backup, or move it away to start with no sessions"
            ) from None

    def _create(self):
        """A new store appears whole (schema and version in place) or not at all: never as 0 bytes."""
        temporary = f"{self.path}.{os.getpid()}.new"
        os.close(open_private(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        try:
            db = sqlite3.connect(temporary, isolation_level=None)
            try:
                db.executescript(SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            finally:
                db.close()
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            os.unlink(temporary)

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if not read_only:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            return db
        uri = "file:" + urllib.parse.quote(self.path)
        try:
            db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.OperationalError:
            # A WAL store on a read-only file system cannot get its shared-memory file: read it as it is.
            return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False)

    def _identity(self) -> tuple[int, int]:
        status = os.stat(self.path)
        if status.st_size == 0:
            raise OperationFailed(
                f"store {self.path} is empty (0 bytes), which is not a vtap store and not an empty desired state: "
                "restore it from a backup, or delete it to start with no sessions"
            )
        return status.st_dev, status.st_ino

    def check_identity(self) -> None:
        """Raise StoreChanged unless the path still names the file this store opened, with content of a schema we know."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            raise StoreChanged(f"store {self.path} was deleted while vtap had it open; nothing was changed") from None
        if (status.st_dev, status.st_ino) != self.identity:
            raise StoreChanged(f"store {self.path} was replaced by another file while vtap had it open; nothing was changed")
        if status.st_size == 0:
            raise StoreChanged(f"store {self.path} was emptied (0 bytes) while vtap had it open; nothing was changed")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreChanged(f"store {self.path} was upgraded to schema version {version} by a newer vtap while this one had it open; nothing was changed")

    def check_writable(self) -> None:
        if self.read_only:
            raise OperationFailed(f"{self.read_only}; nothing was changed")

    @property
    def state_dir(self) -> str:
        return os.path.dirname(self.path)

    def close(self):
        self.db.close()

    @contextlib.contextmanager
    def transaction(self):
        """One all-or-nothing unit; writers are serialized across processes.

        A write the disk cannot take (full, read-only, I/O error) is an
        OperationFailed naming the store; the store then holds what it held.
        """
        self.check_writable()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise OperationFailed(f"store {self.path}: cannot write ({exc})") from None

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
        return [TapFlow.from_dict(data) for data in _json_rows([data for (data,) in rows])]

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
        """This driver's whole desired state becomes exactly these (call inside a transaction).

        The same rules as put_session/put_flow (names unique, every flow's session
        present), checked in memory: one statement per table, not three per row.
        """
        names = {s.name for s in sessions}
        if len(names) != len(sessions):
            raise AlreadyExists("a session name is given twice")
        if len({f.name for f in flows}) != len(flows):
            raise AlreadyExists("a flow name is given twice")
        for flow in flows:
            if flow.session not in names:
                raise NotFound(f"session {flow.session!r} does not exist")
        self.db.execute("DELETE FROM flows WHERE driver=?", (self.driver,))
        self.db.execute("DELETE FROM sessions WHERE driver=?", (self.driver,))
        self.db.executemany(
            "INSERT INTO sessions (driver, name, data) VALUES (?, ?, ?)",
            [(self.driver, s.name, json.dumps(s.to_dict())) for s in sessions],
        )
        self.db.executemany(
            "INSERT INTO flows (driver, name, session, data) VALUES (?, ?, ?, ?)",
            [(self.driver, f.name, f.session, json.dumps(f.to_dict())) for f in flows],
        )

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

    def in_audit(self, name: str) -> bool:
        """Whether some change of this driver named it (a session or flow that existed once)."""
        row = self.db.execute("SELECT 1 FROM audit WHERE driver=? AND instr(change, ?) LIMIT 1", (self.driver, json.dumps(name)))
        return row.fetchone() is not None

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


def _why_read_only(path: str) -> str:
    """Why the store cannot be written here ("" when it can): its file or its folder is read-only."""
    if os.access(path, os.W_OK) and os.access(os.path.dirname(path), os.W_OK):
        return ""
    return f"store {path} is read-only here (its file or folder cannot be written): listings, status and audit work, changes do not"


def host_name() -> str:
    """This machine's identity in the fleet (audit rows, hosts, agents): VTAP_HOST, else the host name."""
    return os.environ.get("VTAP_HOST") or socket.gethostname()


def current_user() -> str:
    """The OS user, as the person behind sudo when there is one."""
    try:
        name = getpass.getuser()
    except Exception:
        name = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (as {name})" if sudo and sudo != name else name


def _json_rows(texts: list[str]) -> list:
    """json.loads() of each text, as one parse: 10,000 flow rows cost one call, not 10,000.

    A row that is not one JSON value (a damaged file) could split or merge items:
    then each row is parsed alone, and raises as it always did.
    """
    try:
        values = json.loads("[" + ",".join(texts) + "]")
    except ValueError:
        values = None
    if values is None or len(values) != len(texts):
        return [json.loads(text) for text in texts]
    return values
