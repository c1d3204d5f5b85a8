"""Electing one follower of a central manager (vCenter) among a fleet's, with an etcd lease.

    /PREFIX/leaders/DRIVER/PLATFORM    {host, pid, driver, platform, since}, under the leader's lease

PLATFORM is a digest of what the driver is connected to (its URL), so two vCenters in one fleet
have a leader each. Campaigning is one txn: put the key under my lease if it does not exist
(create_revision == 0). The key's create revision is then my term. Standbys watch the key and
campaign again when it is deleted (the leader resigned, or etcd ended its lease).

Fencing: the leader keeps its lease alive every ttl/5 seconds and knows, from its own clock, until
when the lease is surely alive (the time it SENT the last answered keepalive + the TTL etcd gave
back: etcd counts from when it received it, which is later). Before each apply, fence() checks that
time, then writes the apply's audit row in a txn that compares the key's create revision with my
term: a deposed leader (lease ended, someone else's key) has that write refused and applies nothing.

Plain etcd3gw leases and txns rather than tooz: tooz's etcd3gw election hides the lease and the
key's revision, and fencing needs both (a txn comparing on the leader key, a lease deadline).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time

from vtap_core.leader import NotLeader
from vtap_core.stores.etcd import _b64, _unb64

log = logging.getLogger("vtap.leader")
MARGIN = 1.0  # seconds of lease that must be left to start an apply: time for its request to land


class EtcdElection:
    def __init__(self, store, platform: str, host: str, ttl: int):
        self.store = store
        self.host = host
        self.ttl = ttl
        self.platform = platform
        digest = hashlib.sha256(platform.encode()).hexdigest()[:16]
        self.key = f"{store.prefix}/leaders/{store.driver}/{digest}"
        self._key = _b64(self.key)
        self.lease = None
        self.term = None  # the leader key's create revision while I lead
        self._valid_until = 0.0  # monotonic time until which my lease is surely alive
        self._lock = threading.Lock()
        self._standing_by = None  # the leader last logged

    # campaigning ----------------------------------------------------------

    def campaign(self, stop: threading.Event, wait: bool = True) -> bool:
        """Block until I lead (True) or stop is set (False); stand by while another leads. wait=False: one try."""
        delay = 0.5
        while not stop.is_set():
            try:
                revision = self._try_once()
                if revision is None:
                    return True
                if not wait:
                    return False
                delay = 0.5
                self._wait_for_change(revision, stop)
            except Exception as exc:  # etcd away: try again, never lead without it
                if not wait:
                    raise
                log.warning("cannot campaign (%s); trying again", exc)
                stop.wait(delay)
                delay = min(delay * 2, self.ttl)
        return False

    def _try_once(self) -> int | None:
        """None when I now lead; else the revision at which someone else did."""
        sent = time.monotonic()
        grant = self.store._post("/lease/grant", {"TTL": self.ttl})
        lease = int(grant["ID"])
        value = json.dumps({"host": self.host, "pid": os.getpid(), "driver": self.store.driver, "platform": self.platform,
                            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, sort_keys=True)
        reply = self.store._post("/kv/txn", {
            "compare": [{"key": self._key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": self._key, "value": _b64(value), "lease": lease}}],
            "failure": [{"request_range": {"key": self._key}}],
        })
        revision = int(reply["header"]["revision"])
        if reply.get("succeeded"):
            with self._lock:
                self._standing_by = None
                self.lease, self.term = lease, revision
                self._valid_until = sent + int(grant["TTL"])
            log.info("leading %s (term %d)", self.platform, revision)
            return None
        self.store._post("/lease/revoke", {"ID": lease})  # not needed: do not leave it to expire
        kvs = reply["responses"][0]["response_range"].get("kvs", [])
        leader = json.loads(_unb64(kvs[0]["value"])) if kvs else {}
        if leader.get("host") != self._standing_by:
            self._standing_by = leader.get("host")
            log.info("standing by: %s (pid %s) leads %s", leader.get("host"), leader.get("pid"), self.platform)
        return revision

    def _wait_for_change(self, revision: int, stop: threading.Event) -> None:
        """Return when the leader key changed after revision (short watch requests, so stop is noticed)."""
        changed = False
        try:
            while not changed and not stop.is_set():
                changed, revision = self.store._watch_once(revision, key=self.key)
        except Exception:
            self.store._watching += 1  # the next member next time, as the desired state's watch does
            raise

    # leading --------------------------------------------------------------

    def keep_alive(self) -> bool:
        """Renew my lease; False once it has ended or cannot be shown alive any more."""
        sent = time.monotonic()
        try:
            reply = self.store._post("/lease/keepalive", {"ID": self.lease})
            ttl = int(reply.get("result", {}).get("TTL", 0) or 0)
        except Exception as exc:
            log.warning("cannot renew the leader lease: %s", exc)
            return self.valid()
        with self._lock:
            if ttl <= 0:
                self._valid_until = 0.0  # etcd ended it: someone else may lead already
            else:
                self._valid_until = max(self._valid_until, sent + ttl)
        return self.valid()

    def valid(self) -> bool:
        return self.term is not None and time.monotonic() < self._valid_until - MARGIN

    def fence(self, command: str, change: dict) -> None:
        """Raise NotLeader unless I still lead; record the apply in the audit log under my term."""
        if not self.valid():
            raise NotLeader(f"not leading {self.platform} any more (lease ended or not renewed): nothing applied")
        key, value = self.store.audit_entry(command, {**change, "leader": self.host, "term": self.term})
        reply = self.store._post("/kv/txn", {
            "compare": [{"key": self._key, "result": "EQUAL", "target": "CREATE", "create_revision": self.term}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
            "failure": [],
        })
        if not reply.get("succeeded"):
            self._valid_until = 0.0
            raise NotLeader(f"term {self.term} of {self.platform} is over (the leader key expired or another follower holds it): nothing applied")
        if not self.valid():  # the txn took most of what was left
            raise NotLeader(f"the leader lease of {self.platform} ran out during the fence: nothing applied")

    def resign(self) -> None:
        """Give leadership up at once (a clean stop): a standby need not wait for the TTL."""
        lease, self.term, self._valid_until = self.lease, None, 0.0
        if lease is not None:
            try:
                self.store._post("/lease/revoke", {"ID": lease})
            except Exception as exc:  # usually: etcd already ended it
                log.info("leader lease not revoked (%s); it ends within %ss anyway", exc, self.ttl)
        self.lease = None
