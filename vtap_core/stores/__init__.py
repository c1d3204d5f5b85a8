"""The store interface: where desired state and the audit log live.

Two backends, chosen by the scheme of a store URL (`--store`, `VTAP_STORE`,
`[store] url`) through the stevedore entry points `vtap.stores`, the way the
drivers are chosen by name:

    (no URL) or sqlite:///PATH   one host: the embedded SQLite file (vtap_core.store)
    etcd://HOST:PORT[,...]/PREFIX a fleet: one desired state in etcd, many hosts
    etcds://...                   the same over TLS

The client only ever does: lock() around a change or a reconcile; snapshot()
to read; then, inside transaction(), replace_all() and record(). A backend
shared by many machines makes transaction() a compare-and-swap on what the
last snapshot() read, and raises Conflict when someone else committed first:
the client then reads again and re-runs the change.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os

from vtap_core.errors import OperationFailed, TemporaryError, ValidationError
from vtap_core.redact import redact
from vtap_core.safefile import open_private

GROUP = "vtap.stores"
URL_FORMS = "etcd://HOST:PORT[,HOST:PORT...]/PREFIX, etcds://... (TLS) or sqlite:///PATH"


class Conflict(TemporaryError):
    """Someone else changed the desired state between this command's read and its commit."""


class StoreUnavailable(OperationFailed):
    """The store cannot be read or written now (etcd down): nothing was changed."""


class DesiredStore(abc.ABC):
    """Desired state (per driver) and the append-only audit log."""

    driver: str
    lock_path: str  # a local file: serializes this host's changes and reconciles
    shared = False  # many hosts read this desired state: each realizes only its own part of it

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str | None, driver: str, state: str | None, settings: dict) -> "DesiredStore":
        """Validate url and settings (ValidationError, nothing created), then open."""

    @property
    @abc.abstractmethod
    def state_dir(self) -> str:
        """This host's private directory for the driver's own files (catalogs, capture pids)."""

    @abc.abstractmethod
    def close(self): ...

    @contextlib.contextmanager
    def lock(self):
        with os.fdopen(open_private(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_writable(self) -> None:
        """Raise OperationFailed when this store cannot take a change now (before anything is done)."""

    def check_identity(self) -> None:
        """Raise when the store was swapped under this process (a file replaced); a network store has nothing to check."""

    @abc.abstractmethod
    def in_audit(self, name: str) -> bool:
        """Whether some change of this driver named it (a session or flow that existed once)."""

    @abc.abstractmethod
    def transaction(self):
        """Context manager: all or nothing; Conflict if what snapshot() read has changed since."""

    @abc.abstractmethod
    def sessions(self) -> list: ...

    @abc.abstractmethod
    def session(self, name: str): ...

    @abc.abstractmethod
    def flows(self, session: str | None = None) -> list: ...

    @abc.abstractmethod
    def snapshot(self) -> tuple[list, list]: ...

    @abc.abstractmethod
    def replace_all(self, sessions: list, flows: list): ...

    @abc.abstractmethod
    def record(self, command: str, change: dict, user: str | None = None): ...

    @abc.abstractmethod
    def audit(self, all_drivers: bool = True) -> list[dict]: ...

    # a fleet's hosts: only shared stores have them ---------------------------

    def heartbeat(self, host: str, info: dict, ttl: int) -> None:
        """Say (again) that `host` is alive, for ttl seconds; called by `vtap agent` every ttl/3."""
        raise ValidationError("store", "hosts and agents need a fleet's shared store: --store etcd://HOST:PORT/PREFIX (this is one host's SQLite file)")

    def hosts(self) -> list[dict]:
        self.heartbeat("", {}, 0)  # the same refusal
        return []

    def report(self, host: str, rows: dict) -> None:
        """Publish what `host` observed for its flows ({flow: status dict}); a one-host store has no readers."""

    def observed(self) -> list[dict]:
        """What every host reported for this driver's flows, each with its `host`."""
        return []

    def election(self, platform: str, host: str, ttl: int):
        """The election among this fleet's followers of one central manager; None: one host, no election."""
        return None

    def leaders(self) -> list[dict]:
        """Who leads each central manager now: {host, pid, driver, platform, since}."""
        return []

    def watch_desired(self, stop):
        """Yields each time the desired state may have changed; a one-host store never changes under us."""
        stop.wait()
        return iter(())


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def scheme_of(url: str | None) -> str:
    if not url:
        return "sqlite"
    if "://" not in url:
        raise ValidationError("store", f"{redact(url)!r} is not a store URL; use {URL_FORMS}")
    return url.split("://", 1)[0].lower()


def open_store(url: str | None, driver: str, state: str | None = None, settings: dict | None = None) -> DesiredStore:
    """The store named by url (default: the SQLite file at state); bad URLs and settings are ValidationErrors."""
    from stevedore import driver as stevedore_driver

    scheme = scheme_of(url)
    if scheme not in _entry_points():
        raise ValidationError("store", f"unknown scheme {scheme!r} in {redact(url)!r}; use {URL_FORMS}")

    def fail(_manager, entrypoint, exc):
        missing = getattr(exc, "name", None)
        why = f"missing Python module {missing!r}" if isinstance(exc, ImportError) and missing else f"{type(exc).__name__}: {exc}"
        raise OperationFailed(f"store backend {entrypoint.name} failed to load: {why}") from exc

    backend = stevedore_driver.DriverManager(namespace=GROUP, name=scheme, invoke_on_load=False, on_load_failure_callback=fail).driver
    return backend.from_url(url, driver=driver, state=state, settings=dict(settings or {}))
