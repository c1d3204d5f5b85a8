"""A fleet's store in etcd (v3, through its JSON gateway, with etcd3gw).

Key layout under /PREFIX (two prefixes on one etcd are two fleets that never
see each other):

    /PREFIX/desired/DRIVER/generation        bumped by every change: the compare-and-swap guard
    /PREFIX/desired/DRIVER/sessions/NAME     a TapSession as JSON
    /PREFIX/desired/DRIVER/flows/NAME        a TapFlow as JSON
    /PREFIX/audit/TIME_NS-RANDOM             one audit row as JSON; written once (create_revision == 0)
    /PREFIX/hosts/NAME                       a live host (driver, version, last reconcile, problems), under its lease
    /PREFIX/observed/DRIVER/FLOW/HOST        what HOST's agent observed for FLOW (no lease: a dead host's rows show as stale)
    /PREFIX/leaders/DRIVER/PLATFORM          the follower elected to apply to one central manager, under its lease (etcd_election.py)

A change reads the driver's whole desired state in one range request, then
commits in ONE transaction guarded by the generation's mod_revision it read:
if someone else committed in between, nothing is written and Conflict is
raised (the client reads again and re-runs the change). The audit row is in
the same transaction, so a change and its audit row exist together or not at all.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass

from vtap_core.errors import NotFound, ValidationError
from vtap_core.model import TapFlow, TapSession
from vtap_core.safefile import private_dirs
from vtap_core.store import current_user, default_path, host_name
from vtap_core.stores import URL_FORMS, Conflict, DesiredStore, StoreUnavailable

PREFIX_RULE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
ENDPOINT_RULE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")
TIMEOUT = 5.0
# Seconds the desired state's watch stream may stay silent before it is made again (a member that
# went silent is noticed then). A stop cuts it at once: it need not be short for that.
WATCH_IDLE = 10.0


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def parse_url(url: str) -> tuple[bool, list[tuple[str, int]], str]:
    """(tls, [(host, port)...], prefix) of etcd[s]://HOST:PORT[,HOST:PORT...]/PREFIX."""
    scheme, rest = url.split("://", 1)
    netloc, _, prefix = rest.partition("/")
    if "@" in netloc:
        raise ValidationError("store", "no user or password in the store URL; use VTAP_STORE_USER / VTAP_STORE_PASSWORD or [store] in the config file")
    if "?" in rest or "#" in rest:
        raise ValidationError("store", f"no query or fragment in a store URL; use {URL_FORMS}")
    endpoints = []
    for item in netloc.split(","):
        match = ENDPOINT_RULE.match(item)
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValidationError("store", f"{item!r} is not HOST:PORT (port 1-65535); use {URL_FORMS}")
        endpoints.append((match["host"].strip("[]"), int(match["port"])))
    prefix = prefix.strip("/")
    if not PREFIX_RULE.match(prefix) or any(part in (".", "..") for part in prefix.split("/")):
        raise ValidationError("store", f"the prefix {prefix!r} must be letters, digits, '.', '_', '-' and '/' (e.g. /vtap/prod); use {URL_FORMS}")
    return scheme.lower() == "etcds", endpoints, prefix


def _error_text(exc) -> str:
    """etcd's own words from a refused gateway call (its JSON body), else the HTTP reason."""
    try:
        return str(json.loads(exc.detail_text)["error"])
    except (TypeError, ValueError, KeyError):
        return str(exc)


def _refused(client, exc) -> Exception:
    where = f"etcd store at {client.host}:{client.port}"
    detail = _error_text(exc)
    settings = "VTAP_STORE_USER / VTAP_STORE_PASSWORD or [store] user and password in the config file"
    if "authentication failed" in detail:
        return ValidationError("store user/password", f"{where} refused them ({detail.removeprefix('etcdserver: ')}); they come from {settings}")
    if "user name is empty" in detail:
        return ValidationError("store user", f"{where} has authentication enabled: set {settings}")
    return StoreUnavailable(f"{where} refused the request: {detail}")


def _check_file(name: str, path) -> str:
    if not isinstance(path, str) or not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValidationError(f"store {name}", f"{path!r} is not a readable file")
    return path


@dataclass(frozen=True)
class View:
    """The desired state at one revision, as snapshot() hands it out (copies of the lists)."""

    guard: int  # the generation's mod_revision
    version: int | None  # the watch copy's version it was made from; None: read from etcd
    sessions: list
    flows: list
    seen: dict  # key -> JSON value
    objects: dict  # key -> (JSON value, TapSession or TapFlow)


class EtcdStore(DesiredStore):
    shared = True
    def __init__(self, endpoints, prefix: str, driver: str, state: str | None = None, tls: bool = False,
                 ca=None, cert=None, key=None, insecure=False, user=None, password=None, timeout=TIMEOUT):
        import etcd3gw

        self.driver = driver
        self.prefix = "/" + prefix
        self.endpoints = endpoints
        self._local = os.path.dirname(os.path.abspath(state or default_path()))
        private_dirs(self._local)
        self.lock_path = os.path.join(self._local, "fleet.lock")
        self._clients = []
        for host, port in endpoints:
            client = etcd3gw.client(host=host, port=port, protocol="https" if tls else "http", ca_cert=ca,
                                    cert_cert=cert, cert_key=key, timeout=timeout, api_path="/v3/")
            if insecure:
                client.session.verify = False
            if ca or insecure:
                # Otherwise REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE from the environment win over session.verify.
                client.session.trust_env = False
            self._clients.append(client)
        self._credentials = (user, password) if user else None
        self._authenticated: set[int] = set()
        self._guard = None  # the generation's mod_revision the last snapshot() read
        self._seen: dict[str, str] = {}  # key -> value, as the last snapshot() read them
        self._ops: list | None = None
        self._watching = 0  # which member watch_desired() streams from
        self._pending_state: dict | None = None  # key -> value this transaction's replace_all() makes true
        # While watch_desired() runs (an agent), the desired state as its events left it:
        # key -> (value, TapSession/TapFlow), and the generation's mod_revision. None: read etcd.
        self._copy: dict | None = None
        self._copy_guard = 0
        self._copy_lock = threading.Lock()
        self._copy_version = 0  # bumped whenever the copy changes: the view below is of one version
        # The last snapshot as lists, kept while the desired state is unchanged (a change or reconcile
        # over 10,000 flows must not parse, sort and compare all of them again): see _view_of().
        self._view: View | None = None
        self._stream = None  # the socket of the desired state's watch stream being read (_cut_stream_on)
        self._pending_objects: dict = {}  # key -> (value, object) this transaction's replace_all() makes true

    @classmethod
    def from_url(cls, url, driver, state, settings):
        tls, endpoints, prefix = parse_url(url)
        unknown = set(settings) - {"ca", "cert", "key", "insecure", "user", "password"}
        if unknown:
            raise ValidationError("store", f"unknown setting(s) {', '.join(sorted(unknown))}; allowed: ca, cert, key, insecure, user, password")
        tls_settings = {k: settings[k] for k in ("ca", "cert", "key") if settings.get(k)}
        if tls_settings and not tls:
            raise ValidationError("store", f"{', '.join(sorted(tls_settings))} set for a plain etcd:// URL; use etcds:// for TLS")
        if bool(settings.get("cert")) != bool(settings.get("key")):
            raise ValidationError("store", "a client certificate needs both cert and key")
        for name, path in tls_settings.items():
            _check_file(name, path)
        if settings.get("password") and not settings.get("user"):
            raise ValidationError("store", "a password needs a user (VTAP_STORE_USER or [store] user)")
        return cls(endpoints, prefix, driver, state, tls=tls, ca=settings.get("ca"), cert=settings.get("cert"),
                   key=settings.get("key"), insecure=bool(settings.get("insecure")), user=settings.get("user"),
                   password=settings.get("password"))

    @property
    def state_dir(self) -> str:
        return self._local

    def close(self):
        for client in self._clients:
            client.session.close()

    # talking to etcd ------------------------------------------------------

    def _post(self, path: str, payload: dict) -> dict:
        """One gateway call, to the first member that answers; StoreUnavailable when none does."""
        from etcd3gw import exceptions

        problems = []
        # Each member twice: a pooled connection to a member that restarted fails once, then works.
        for i, client in list(enumerate(self._clients)) * 2:
            try:
                self._authenticate(i, client)
                return client.post(client.get_url(path), json=payload)
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError, exceptions.InternalServerError) as exc:
                problems.append(f"{client.host}:{client.port}: {type(exc).__name__}")
            except exceptions.Etcd3Exception as exc:
                if "invalid auth token" in _error_text(exc) and i in self._authenticated:
                    # The token lived its --auth-token-ttl (5 min by default): the next pass asks for a new one.
                    self._authenticated.discard(i)
                    problems.append(f"{client.host}:{client.port}: auth token expired")
                    continue
                raise _refused(client, exc) from None
        raise StoreUnavailable(f"etcd store unreachable, nothing was changed ({'; '.join(dict.fromkeys(problems))})")

    def _authenticate(self, i: int, client):
        if self._credentials is None or i in self._authenticated:
            return
        user, password = self._credentials
        reply = client.post(client.get_url("/auth/authenticate"), json={"name": user, "password": password})
        client.session.headers["Authorization"] = reply["token"]
        self._authenticated.add(i)

    def _range(self, prefix: str) -> tuple[int, list[dict]]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        reply = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return int(reply["header"]["revision"]), reply.get("kvs", [])

    def _range_key(self, key: str) -> tuple[int, list[dict]]:
        reply = self._post("/kv/range", {"key": _b64(key)})
        return int(reply["header"]["revision"]), reply.get("kvs", [])

    def _desired(self) -> str:
        return f"{self.prefix}/desired/{self.driver}/"

    # reading --------------------------------------------------------------

    def snapshot(self) -> tuple[list[TapSession], list[TapFlow]]:
        """The whole desired state at one revision; remembered as the guard of the next transaction.

        In an agent, the copy its store watch keeps (no request at all); else one small request for
        the generation, and the whole range only when it moved since the last snapshot.
        """
        view = self._current_view()
        self._guard = view.guard
        self._seen = view.seen
        return list(view.sessions), list(view.flows)

    def _current_view(self) -> "View":
        with self._copy_lock:
            if self._copy is not None:
                if self._view is None or self._view.version != self._copy_version:
                    self._view = self._view_of(self._copy_guard, self._copy, self._copy_version)
                return self._view
        view = self._view
        if view is not None and view.version is None:
            _, kvs = self._range_key(self._desired() + "generation")
            if kvs and int(kvs[0]["mod_revision"]) == view.guard:
                return view  # nothing committed since: no need to read and parse every flow again
        _, kvs = self._range(self._desired())
        guard, copy = self._parse_all(kvs, view.objects if view is not None else {})
        self._view = self._view_of(guard, copy, None)
        return self._view

    @staticmethod
    def _view_of(guard: int, copy: dict, version: int | None) -> "View":
        """copy: {key: (value, object)}, as _parse_all and the watch's copy hold it."""
        objects = dict(copy)
        ordered = [objects[key][1] for key in sorted(objects)]
        sessions = [o for o in ordered if isinstance(o, TapSession)]
        flows = sorted((o for o in ordered if isinstance(o, TapFlow)), key=lambda f: (f.session, f.name))
        return View(guard, version, sessions, flows, {key: value for key, (value, _) in objects.items()}, objects)

    def _parse_all(self, kvs, known: dict | None = None) -> tuple[int, dict]:
        """(the generation's mod_revision, {key: (value, model object)}) of a range of desired/DRIVER/.

        known: {key: (value, object)} read before; an unchanged value is not parsed again.
        """
        guard, parsed, known = 0, {}, known or {}
        for kv in kvs:
            key = _unb64(kv["key"])
            if key == self._desired() + "generation":
                guard = int(kv["mod_revision"])
            else:
                value = _unb64(kv.get("value", ""))
                before = known.get(key)
                parsed[key] = before if before is not None and before[0] == value else (value, self._parse(key, value))
        return guard, parsed

    def _parse(self, key: str, value: str):
        if key.startswith(self._desired() + "sessions/"):
            return TapSession.from_dict(json.loads(value))
        if key.startswith(self._desired() + "flows/"):
            return TapFlow.from_dict(json.loads(value))
        return None

    def sessions(self) -> list[TapSession]:
        return self.snapshot()[0]

    def session(self, name: str) -> TapSession:
        for session in self.sessions():
            if session.name == name:
                return session
        raise NotFound(f"session {name!r} does not exist")

    def has_session(self, name: str) -> bool:
        return any(s.name == name for s in self.sessions())

    def has_flow(self, name: str) -> bool:
        return any(f.name == name for f in self.flows())

    def flows(self, session: str | None = None) -> list[TapFlow]:
        return [f for f in self.snapshot()[1] if session is None or f.session == session]

    def audit(self, all_drivers: bool = True) -> list[dict]:
        _, kvs = self._range(f"{self.prefix}/audit/")
        rows = []
        for kv in sorted(kvs, key=lambda kv: int(kv["create_revision"])):
            row = json.loads(_unb64(kv["value"]))
            if all_drivers or row.get("driver") == self.driver:
                rows.append({"id": int(kv["create_revision"]), **row})
        return rows

    def in_audit(self, name: str) -> bool:
        return any(json.dumps(name) in json.dumps(row["change"]) for row in self.audit(all_drivers=False))

    # changing -------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self):
        if self._guard is None:
            self.snapshot()
        self._ops, self._pending_state, self._pending_objects = [], None, {}
        try:
            yield self
            self._commit(self._ops)
        finally:
            self._ops = None

    def replace_all(self, sessions: list[TapSession], flows: list[TapFlow]):
        read = self._view.objects if self._view is not None and self._view.seen is self._seen else {}

        def value(key, obj):
            # The very object the snapshot read has the value it was read with: 10,000 flows, one of them new.
            before = read.get(key)
            return before[0] if before is not None and before[1] is obj else json.dumps(obj.to_dict(), sort_keys=True)

        objects = {f"{self._desired()}sessions/{s.name}": s for s in sessions}
        objects.update({f"{self._desired()}flows/{f.name}": f for f in flows})
        wanted = {key: value(key, obj) for key, obj in objects.items()}
        self._pending_objects = {key: (wanted[key], obj) for key, obj in objects.items()}
        ops = [{"request_delete_range": {"key": _b64(k)}} for k in self._seen if k not in wanted]
        ops += [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in wanted.items() if self._seen.get(k) != v]
        ops.append({"request_put": {"key": _b64(self._desired() + "generation"), "value": _b64(uuid.uuid4().hex)}})
        self._queue(ops, state=wanted)

    def record(self, command: str, change: dict, user: str | None = None):
        key, value = self.audit_entry(command, change, user)
        self._queue([{"request_put": {"key": _b64(key), "value": _b64(value)}}], audit_key=key)

    def audit_entry(self, command: str, change: dict, user: str | None = None) -> tuple[str, str]:
        """(key, JSON value) of a new audit row; record() queues it, a leader's fence writes it under its own compare."""
        row = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "user": user or current_user(),
            "host": host_name(),
            "driver": self.driver,
            "command": command,
            "change": change,
        }
        key = f"{self.prefix}/audit/{dt.datetime.now(dt.timezone.utc).timestamp() * 1e9:020.0f}-{uuid.uuid4().hex[:8]}"
        return key, json.dumps(row, sort_keys=True)

    def _queue(self, ops: list, state: dict | None = None, audit_key: str | None = None):
        if self._ops is None:  # outside a transaction: a transaction of its own
            with self.transaction():
                return self._queue(ops, state, audit_key)
        self._ops.extend(ops)
        if state is not None:
            self._pending_state = state
        if audit_key is not None:
            self._ops.append({"compare_create": audit_key})

    def _commit(self, queued: list):
        # Desired state is guarded by the generation read; an audit row alone needs no guard.
        guarded = self._pending_state is not None
        compare = [{"key": _b64(self._desired() + "generation"), "result": "EQUAL", "target": "MOD", "mod_revision": self._guard}] if guarded else []
        success = []
        for op in queued:
            if "compare_create" in op:  # audit rows are written once, never over another
                compare.append({"key": _b64(op["compare_create"]), "result": "EQUAL", "target": "CREATE", "create_revision": 0})
            else:
                success.append(op)
        if not success:
            return
        try:
            reply = self._post("/kv/txn", {"compare": compare, "success": success, "failure": []})
        except StoreUnavailable as exc:
            if "too many operations" in str(exc) or "too large" in str(exc):
                # One change is one transaction (all or nothing): it is never split, so it must fit.
                raise StoreUnavailable(
                    f"this change writes {len(success)} keys ({sum(len(json.dumps(op)) for op in success) // 1024} KiB) in one etcd transaction, "
                    "more than the etcd server takes (its --max-txn-ops, 128 by default, and --max-request-bytes, 1.5 MiB): "
                    "nothing was changed; raise those limits on every etcd member or apply the file in parts"
                ) from None
            raise
        if not reply.get("succeeded"):
            if guarded:
                self._guard = None
            raise Conflict("the desired state changed while this command ran")
        if guarded:
            self._guard = int(reply["header"]["revision"])
            # What this transaction wrote is the desired state at that revision: the next snapshot
            # here reads it back only if someone else commits in between.
            self._view = self._view_of(self._guard, self._pending_objects, None)
            self._seen = self._view.seen

    # hosts and watches ----------------------------------------------------

    def heartbeat(self, host: str, info: dict, ttl: int) -> None:
        """Keep /PREFIX/hosts/HOST alive under a lease; a lease that ended (etcd was away) is granted again."""
        lease = getattr(self, "_lease", None)
        if lease is not None:
            alive = self._post("/lease/keepalive", {"ID": lease}).get("result", {}).get("TTL")
            if not alive or int(alive) <= 0:
                lease = None
        if lease is None:
            lease = int(self._post("/lease/grant", {"TTL": ttl})["ID"])
        self._lease = lease
        value = json.dumps({"host": host, **info}, sort_keys=True)
        self._post("/kv/put", {"key": _b64(f"{self.prefix}/hosts/{host}"), "value": _b64(value), "lease": lease})

    def hosts(self) -> list[dict]:
        _, kvs = self._range(f"{self.prefix}/hosts/")
        return [json.loads(_unb64(kv["value"])) for kv in kvs]

    def election(self, platform: str, host: str, ttl: int):
        from vtap_core.stores.etcd_election import EtcdElection

        return EtcdElection(self, platform, host, ttl)

    def leaders(self) -> list[dict]:
        _, kvs = self._range(f"{self.prefix}/leaders/")
        return [json.loads(_unb64(kv["value"])) for kv in kvs]

    def watch_desired(self, stop):
        """Yields after every change of this driver's desired state: [(old, new)] sessions and flows
        (None where there is none), or None for "anything may have changed".

        It keeps a copy of the desired state from one range and then the watch's events, which
        snapshot() reads while it runs: a change costs an agent no request beyond its watch, however
        many flows the fleet has. It yields None once the copy is read (at the start and after
        each failure or compaction). One watch stream carries change after change until it has been
        silent WATCH_IDLE seconds (a stop cuts it at once); the next starts where it ended. When etcd
        is away the copy is dropped (reads fail as they would without it), it tries again with backoff
        and yields None; when that revision was compacted, it lists everything again and yields None.
        """
        import requests

        revision = None
        delay = 0.5
        known: dict = {}  # the copy dropped last, to parse again only what changed meanwhile
        threading.Thread(target=self._cut_stream_on, args=(stop,), name="vtap-store-watch-stop", daemon=True).start()
        try:
            while not stop.is_set():
                try:
                    if revision is None:
                        revision, kvs = self._range(self._desired())
                        guard, copy = self._parse_all(kvs, known)  # a re-list parses only what changed
                        known = {}
                        with self._copy_lock:
                            self._copy, self._copy_guard = copy, guard
                            self._copy_version += 1
                        yield None  # read (again): the caller resyncs from the copy
                    for changes, revision in self._watch_stream(revision, stop=stop):
                        delay = 0.5
                        if changes is True:  # compacted: what happened since is lost; read it all again
                            known = self._drop_copy()
                            revision = None
                            break
                        if changes:
                            yield changes
                    else:
                        delay = 0.5  # silent for WATCH_IDLE seconds, or stopped: a stream that worked
                except (StoreUnavailable, requests.RequestException, ValueError):
                    known = self._drop_copy() or known
                    self._watching += 1  # the next member, as _post does for every other request
                    revision = None
                    stop.wait(delay)
                    delay = min(delay * 2, 10)
        finally:
            self._drop_copy()

    def _cut_stream_on(self, stop) -> None:
        """When stop is set, end the watch stream being read (its thread returns at once, not in WATCH_IDLE s)."""
        stop.wait()
        sock = self._stream
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _drop_copy(self) -> dict:
        """The copy dropped ({} if none): reads go to etcd until the watch has read everything again."""
        with self._copy_lock:
            copy, self._copy = self._copy, None
            self._view = None
        return copy or {}

    def _apply_events(self, events) -> list:
        """Bring the copy (if any) up to these watch events; the (old, new) sessions and flows they changed."""
        changes = []
        with self._copy_lock:
            copy = self._copy
            self._copy_version += 1
            for event in events:
                kv = event["kv"]
                key = _unb64(kv["key"])
                if key == self._desired() + "generation":
                    self._copy_guard = int(kv["mod_revision"])
                    continue
                old = copy.get(key) if copy is not None else None
                new = None
                if event.get("type") != "DELETE":
                    value = _unb64(kv.get("value", ""))
                    new = (value, self._parse(key, value))
                if copy is not None:
                    if new is None:
                        copy.pop(key, None)
                    else:
                        copy[key] = new
                if old or new:
                    changes.append((old and old[1], new and new[1]))
        return changes

    def _watch_once(self, revision: int, key: str | None = None) -> tuple[bool, int]:
        """(whether `key` changed, the revision to resume after) from one watch stream of a second (the
        election's: its caller notices a stop in between)."""
        stream = self._watch_stream(revision, key)
        try:
            return next(stream, (False, revision))
        finally:
            stream.close()

    def _watch_stream(self, revision: int, key: str | None = None, stop=None):
        """Yields ([(old, new)] changed, the revision to resume after) for each batch of events of one
        watch stream; (True, revision) and ends when that revision was compacted.

        With `key` (the election's), that one key is watched, the copy is left alone, and any event is True;
        the stream lives a second. With `stop` (the desired state's), the stream lives until WATCH_IDLE
        silent seconds (changes keep coming on it: no request per change), and a stop cuts it.
        """
        import requests
        from etcd3gw import exceptions

        start = self._desired()
        request = {"create_request": {"key": _b64(start), "range_end": _b64(start[:-1] + chr(ord(start[-1]) + 1)), "start_revision": revision + 1}}
        if key is not None:
            request = {"create_request": {"key": _b64(key), "start_revision": revision + 1}}
        index = self._watching % len(self._clients)
        client = self._clients[index]
        try:
            self._authenticate(index, client)
        except exceptions.Etcd3Exception as exc:
            raise StoreUnavailable(f"etcd watch at {client.host}:{client.port}: {_error_text(exc)}") from None
        try:
            with client.session.post(client.get_url("/watch"), json=request, stream=True, timeout=(TIMEOUT, 1.0 if stop is None else WATCH_IDLE)) as reply:
                if stop is not None:
                    self._stream = reply.raw.connection.sock if reply.raw.connection is not None else None
                    if stop.is_set():  # set before the stream was there to cut
                        return
                for line in reply.iter_lines():
                    message = json.loads(line) if line.strip() else {}
                    if "error" in message or reply.status_code != 200:
                        self._authenticated.discard(index)  # an expired token: the next try authenticates again
                        raise StoreUnavailable(f"etcd watch at {client.host}:{client.port} refused: {message.get('error', reply.status_code)}")
                    result = message.get("result", {})
                    if int(result.get("compact_revision", 0) or 0):
                        yield True, int(result["compact_revision"]) - 1  # compacted: re-list, watch from there
                        return
                    if result.get("events"):
                        revision = max(int(e["kv"]["mod_revision"]) for e in result["events"])
                        yield (True if key is not None else self._apply_events(result["events"])), revision
        except requests.exceptions.ConnectionError as exc:
            if "Read timed out" not in str(exc):
                raise
        except requests.exceptions.ChunkedEncodingError:
            if stop is None or not stop.is_set():
                raise  # (else cut by the stop: not a failure)
        finally:
            if stop is not None:
                self._stream = None

    def report(self, host: str, rows: dict) -> None:
        """Write the rows that differ from what this store last wrote, delete flows no longer reported."""
        written = getattr(self, "_reported", None)
        if written is None:  # after a restart: what this host reported before, to clean it up
            _, kvs = self._range(f"{self.prefix}/observed/{self.driver}/")
            written = {_unb64(kv["key"]): None for kv in kvs if _unb64(kv["key"]).endswith(f"/{host}")}
        wanted = {f"{self.prefix}/observed/{self.driver}/{flow}/{host}": json.dumps(row, sort_keys=True) for flow, row in rows.items()}
        ops = [{"request_delete_range": {"key": _b64(k)}} for k in written if k not in wanted]
        ops += [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in wanted.items() if written.get(k) != v]
        if ops:
            self._post("/kv/txn", {"compare": [], "success": ops, "failure": []})
        self._reported = wanted

    def observed(self) -> list[dict]:
        _, kvs = self._range(f"{self.prefix}/observed/{self.driver}/")
        return [{**json.loads(_unb64(kv["value"])), "host": _unb64(kv["key"]).rsplit("/", 1)[1]} for kv in kvs]
