"""The embedded default: today's SQLite file, behind the store interface."""

from __future__ import annotations

from vtap_core.errors import ValidationError
from vtap_core.store import Store
from vtap_core.stores import DesiredStore


class SqliteStore(Store, DesiredStore):
    """One host's store; changes are serialized by the flock on `<file>.lock` and SQLite's own lock."""

    def __init__(self, path: str | None = None, driver: str = "linux"):
        super().__init__(path, driver=driver)
        self.lock_path = self.path + ".lock"

    @classmethod
    def from_url(cls, url, driver, state, settings):
        if settings:
            raise ValidationError("store", f"{', '.join(sorted(settings))}: only for etcd stores")
        path = state
        if url:
            path = url.split("://", 1)[1]
            if not path.startswith("/"):
                raise ValidationError("store", "sqlite URLs name an absolute path: sqlite:///PATH")
        return cls(path, driver=driver)
