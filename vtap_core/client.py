"""The Python SDK. The `vtap` command line is a thin layer over this class.

    from vtap_core.client import Client

    with Client(driver="linux") as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="eth0", direction="in", filter="tcp port 80")
        for row in vtap.status():
            print(row.flow, row.state, row.packets)
        vtap.delete_session("web")

Every change is validated completely (model, then the driver's plan for the
would-be desired state) before anything is written; then the store is
written and the platform reconciled. If the platform fails half-way, the
store is put back and the platform reconciled to the previous state: all or
nothing per call. Each change appends one audit row.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass

from vtap_core import reconcile, registry, yamlfile
from vtap_core.driver import TargetHealth
from vtap_core.errors import AlreadyExists, NotFound, OperationFailed, Unsupported, ValidationError, VtapError
from vtap_core.model import Source, TapFlow, TapSession, Target, evolve
from vtap_core.redact import check_url_settings, redact
from vtap_core.stores import Conflict, open_store

CONFLICT_RETRIES = 20
SESSION_KEYS = {"name", "to", "snaplen", "sample", "enabled", "backend", "flows"}
FLOW_KEYS = {"name", "vm", "nic", "interface", "direction", "filter"}


@dataclass
class FlowStatus:
    session: str
    flow: str
    source: str
    direction: str
    target: str
    state: str  # active | degraded (the target cannot take some copies now) | partial | missing | inactive (nothing to do here now) | disabled
    desired: int  # platform objects this flow needs now
    observed: int  # of those, present and right
    packets: int
    bytes: int
    problem: str = ""
    dropped: int = 0  # copies the target did not take (packets counts every copy made)
    target_tx_dropped: int = 0  # the target device's own transmit counters (all its traffic)
    target_tx_errors: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Change:
    """What one call did: the plan that was executed, and a message for people."""

    message: str
    plan: reconcile.Plan

    def __str__(self):
        return self.message


class Client:
    def __init__(self, driver: str = "linux", state: str | None = None, command: str | None = None,
                 store: str | None = None, store_settings: dict | None = None, **settings):
        self.driver_name = registry.check_driver_name(driver)
        self.settings = {k: v for k, v in settings.items() if v is not None}
        check_url_settings(self.settings)  # before anything is written: the audit row holds the command line
        self.store = open_store(store, self.driver_name, state, store_settings)  # SQLite file by default, etcd for fleets
        self.command = redact(command or "sdk")
        self._driver = None

    # lifecycle ------------------------------------------------------------

    @property
    def driver(self):
        if self._driver is None:
            self._driver = registry.load_driver(self.driver_name, state_dir=self.store.state_dir, **self.settings)
        return self._driver

    def close(self):
        if self._driver is not None:
            self._driver.close()
            self._driver = None
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def lock(self):
        """Serializes this host's changes and reconciles between vtap processes."""
        return self.store.lock()

    # reading --------------------------------------------------------------

    def sessions(self) -> list[TapSession]:
        return self.store.sessions()

    def session(self, name: str) -> TapSession:
        return self.store.session(name)

    def flows(self, session: str | None = None) -> list[TapFlow]:
        if session is not None:
            self.store.session(session)
        return self.store.flows(session)

    def vms(self):
        return self.driver.inventory()

    def audit(self) -> list[dict]:
        return self.store.audit()

    def describe(self):
        return self.driver.describe()

    # changing -------------------------------------------------------------

    def create_session(self, name, to, snaplen=None, sample=None, backend=None, enabled=True) -> Change:
        session = TapSession(name=name, target=Target.parse(to), snaplen=snaplen, sample=sample, backend=backend, enabled=enabled)
        session = self._absolute_pcap_path(session)

        def mutate(sessions, flows):
            if name in sessions:
                raise AlreadyExists(f"session {name!r} already exists")
            sessions[name] = session
            return {"created session": session.to_dict()}

        return self._change(f"session create {name}", mutate, f"session {name} created")

    def delete_session(self, name) -> Change:
        def mutate(sessions, flows):
            if name not in sessions:
                raise NotFound(f"session {name!r} does not exist")
            removed = [f.name for f in flows.values() if f.session == name]
            for flow in removed:
                del flows[flow]
            return {"deleted session": sessions.pop(name).to_dict(), "deleted flows": removed}

        return self._change(f"session delete {name}", mutate, f"session {name} deleted")

    def set_session_enabled(self, name, enabled: bool) -> Change:
        def mutate(sessions, flows):
            if name not in sessions:
                raise NotFound(f"session {name!r} does not exist")
            old = sessions[name]
            sessions[name] = evolve(old, enabled=enabled)
            return {"session": name, "enabled": enabled}

        verb = "enabled" if enabled else "disabled"
        return self._change(f"session {'enable' if enabled else 'disable'} {name}", mutate, f"session {name} {verb}")

    def add_flow(self, session, vm=None, nic=None, interface=None, direction="both", filter=None, name=None) -> Change:
        source = Source(vm=vm, nic=nic, interface=interface)
        if name is not None:
            TapFlow(name=name, session=session, source=source, direction=direction, filter=filter)
        created = {}

        def mutate(sessions, flows):
            if session not in sessions:
                raise NotFound(f"session {session!r} does not exist")
            flow_name = name or next_flow_name(session, flows)
            if flow_name in flows:
                raise AlreadyExists(f"flow {flow_name!r} already exists")
            flow = TapFlow(name=flow_name, session=session, source=source, direction=direction, filter=filter)
            flows[flow_name] = created["flow"] = flow
            return {"added flow": flow.to_dict()}

        change = self._change(f"flow add {session}", mutate, "flow {name} added to session " + session)
        change.message = change.message.format(name=created["flow"].name)
        change.flow = created["flow"]
        return change

    def delete_flow(self, name) -> Change:
        def mutate(sessions, flows):
            if name not in flows:
                raise NotFound(f"flow {name!r} does not exist")
            return {"deleted flow": flows.pop(name).to_dict()}

        return self._change(f"flow delete {name}", mutate, f"flow {name} deleted")

    def apply_file(self, path: str, prune: bool = False) -> Change:
        document = yamlfile.load_file(path)  # libyaml; refuses non-UTF-8, aliases, deep nesting, duplicate keys
        return self.apply_document(document, prune=prune, source=redact(path))

    def apply_document(self, document, prune: bool = False, source: str = "document") -> Change:
        """Declarative: the sessions in the document, each with exactly its listed flows."""
        wanted_sessions, wanted_flows = parse_document(document)
        wanted_sessions = {n: self._absolute_pcap_path(s) for n, s in wanted_sessions.items()}

        def mutate(sessions, flows):
            for name in wanted_sessions:
                for flow in [f for f in flows.values() if f.session == name]:
                    del flows[flow.name]
            if prune:
                for name in [n for n in sessions if n not in wanted_sessions]:
                    del sessions[name]
                    for flow in [f for f in flows.values() if f.session == name]:
                        del flows[flow.name]
            taken = {f.name: f.session for f in flows.values()}
            for flow in wanted_flows:
                if flow.name in taken:
                    raise AlreadyExists(f"flow {flow.name!r} already exists in session {taken[flow.name]!r}")
            sessions.update(wanted_sessions)
            flows.update({f.name: f for f in wanted_flows})
            return {"applied": source, "sessions": sorted(wanted_sessions), "flows": len(wanted_flows), "prune": prune}

        return self._change(f"apply {source}" + (" --prune" if prune else ""), mutate, f"applied {source}")

    def reconcile(self, scope: str | None = None) -> reconcile.Plan:
        with self.lock():
            sessions, flows = self.store.snapshot()
            return reconcile.reconcile(self.driver, sessions, flows, scope)

    # status ---------------------------------------------------------------

    def status(self) -> list[FlowStatus]:
        sessions = {s.name: s for s in self.store.sessions()}
        flows = self.store.flows()
        problems: list = []
        desired = reconcile.desired_bindings(self.driver, list(sessions.values()), flows, problems)
        observed = {b.key: b for b in self.driver.observe()}
        why = {(s, f): text for s, f, text in problems}
        rows = []
        for flow in flows:
            session = sessions[flow.session]
            mine = [b for b in desired if b.session == flow.session and b.flow == flow.name]
            present = [observed[b.key] for b in mine if b.key in observed and observed[b.key].spec == b.spec]
            counters = [b.counters for b in present if b.counters is not None]
            if not session.enabled:
                state = "disabled"
            elif not mine:
                state = "inactive"
            elif len(present) == len(mine):
                state = "active"
            else:
                state = "partial" if present else "missing"
            dropped, target, trouble = _target_side(counters)
            if state == "active" and target.cut:
                state = "degraded"  # active means delivered: some of these copies cannot be
            problem = why.get((flow.session, flow.name), why.get((flow.session, None), ""))
            rows.append(
                FlowStatus(
                    session=flow.session,
                    flow=flow.name,
                    source=str(flow.source),
                    direction=flow.direction.value,
                    target=str(session.target),
                    state=state,
                    desired=len(mine),
                    observed=len(present),
                    packets=sum(c.packets for c in counters),
                    bytes=sum(c.bytes for c in counters),
                    problem="; ".join(p for p in (problem, *trouble) if p),
                    dropped=dropped,
                    target_tx_dropped=target.tx_dropped,
                    target_tx_errors=target.tx_errors,
                )
            )
        return rows

    # internals ------------------------------------------------------------

    def _absolute_pcap_path(self, session: TapSession) -> TapSession:
        if session.target.kind != "pcap" or os.path.isabs(session.target.path):
            return session
        return evolve(session, target=Target.parse(f"pcap:{os.path.abspath(session.target.path)}"))

    def _change(self, command: str, mutate, message: str) -> Change:
        """_change_once, again from a fresh read while another writer of a shared store commits first."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return self._change_once(command, mutate, message)
            except Conflict:
                time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # spread the retries of racing writers
        raise OperationFailed(f"{command}: the desired state kept changing under it ({CONFLICT_RETRIES} tries); nothing was changed, try again")

    def _change_once(self, command: str, mutate, message: str) -> Change:
        """Validate, write, reconcile; on failure put store and platform back."""
        with self.lock():
            before_sessions, before_flows = self.store.snapshot()
            sessions = {s.name: s for s in before_sessions}
            flows = {f.name: f for f in before_flows}
            change = mutate(sessions, flows)
            touched = _touched_sessions(change, sessions)
            self._validate(sessions, flows, touched)
            after = (list(sessions.values()), list(flows.values()))
            with self.store.transaction():
                self.store.replace_all(*after)
                self.store.record(self.command if self.command != "sdk" else f"sdk: {command}", change)
            try:
                plan = self._realize(*after)
            except Exception as exc:
                self._roll_back(before_sessions, before_flows)
                why = str(exc) if isinstance(exc, VtapError) else f"{type(exc).__name__}: {exc}"
                raise OperationFailed(f"{command} failed and was rolled back: {why}") from exc
        change_message = self._describe(message, plan)
        # A driver that applies only where a VM runs says where this change took effect (proxmox).
        placement = getattr(self.driver, "placement", None)
        note = placement([f for f in flows.values() if f.session in touched]) if placement and touched else ""
        return Change(f"{change_message}; {note}" if note else change_message, plan)

    def _realize(self, sessions, flows) -> reconcile.Plan:
        # Drivers whose other hosts need the desired state too (proxmox: every node) publish it first.
        publish = getattr(self.driver, "publish_desired", None)
        if publish is not None:
            publish(sessions, flows)
        return reconcile.reconcile(self.driver, sessions, flows)

    def _validate(self, sessions: dict, flows: dict, touched: set[str]):
        """The driver must be able to realize what this call touches, beside everything else."""
        if not touched:
            return
        mine = [f for f in flows.values() if f.session in touched]
        for name in touched:
            self.driver.check_features(sessions[name], [f for f in mine if f.session == name])
        self.driver.plan([sessions[n] for n in touched], mine)
        try:
            self.driver.plan(list(sessions.values()), list(flows.values()))
        except (ValidationError, NotFound, Unsupported) as conflict:
            # Either the change clashes with the rest (a VNI used twice), or the rest
            # cannot be planned on its own (a source vanished): only the first is this call's fault.
            others = [s for s in sessions.values() if s.name not in touched]
            try:
                self.driver.plan(others, [f for f in flows.values() if f.session not in touched])
            except (ValidationError, NotFound, Unsupported):
                return
            raise conflict

    def _roll_back(self, sessions, flows):
        with self.store.transaction():
            self.store.replace_all(sessions, flows)
            self.store.record(f"rollback: {self.command}", {"restored sessions": len(sessions), "restored flows": len(flows)})
        try:
            self._realize(sessions, flows)
        except Exception as exc:  # the original error is the one to report
            print(f"vtap: rollback incomplete, run `vtap apply` or `vtap follow` to repair: {exc}", file=sys.stderr)

    @staticmethod
    def _describe(message: str, plan: reconcile.Plan) -> str:
        if plan.add or plan.remove:
            return f"{message} ({len(plan.add)} platform objects added, {len(plan.remove)} removed)"
        return f"{message} (nothing to change on this host now)"


def _touched_sessions(change: dict, sessions: dict) -> set[str]:
    names = set()
    for key in ("created session", "added flow"):
        if key in change:
            names.add(change[key].get("session") or change[key]["name"])
    names.update(change.get("sessions", []))
    return {n for n in names if n in sessions}


def next_flow_name(session: str, flows: dict) -> str:
    """`<session>-<n>` with the smallest n not taken."""
    n = 1
    while f"{session}-{n}" in flows:
        n += 1
    return f"{session}-{n}"


def parse_document(document) -> tuple[dict, list]:
    """The sessions and flows of an `apply` file; unknown keys are errors."""
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ValidationError("file", "the top level must be a mapping with a 'sessions' list")
    _no_unknown_keys("file", document, {"sessions"})
    entries = document.get("sessions") or []
    if not isinstance(entries, list):
        raise ValidationError("sessions", "must be a list")
    sessions, flows = {}, []
    for i, entry in enumerate(entries):
        where = f"sessions[{i}]"
        if not isinstance(entry, dict):
            raise ValidationError(where, "must be a mapping")
        _no_unknown_keys(where, entry, SESSION_KEYS)
        data = {k: v for k, v in entry.items() if k != "flows"}
        if "name" not in data or "to" not in data:
            raise ValidationError(where, "needs 'name' and 'to'")
        session = _build(where, TapSession.from_dict, data)
        if session.name in sessions:
            raise ValidationError(where, f"session {session.name!r} is listed twice")
        sessions[session.name] = session
        taken: dict = {}
        flow_entries = entry.get("flows")
        if flow_entries is not None and not isinstance(flow_entries, list):
            raise ValidationError(f"{where}.flows", "must be a list of flows")
        for j, flow_entry in enumerate(flow_entries or []):
            flow_where = f"{where}.flows[{j}]"
            if not isinstance(flow_entry, dict):
                raise ValidationError(flow_where, "must be a mapping")
            _no_unknown_keys(flow_where, flow_entry, FLOW_KEYS)
            flow_data = dict(flow_entry, session=session.name)
            flow_data.setdefault("name", next_flow_name(session.name, taken))
            flow = _build(flow_where, TapFlow.from_dict, flow_data)
            if flow.name in taken or any(f.name == flow.name for f in flows):
                raise ValidationError(flow_where, f"flow {flow.name!r} is listed twice")
            taken[flow.name] = flow
            flows.append(flow)
    return sessions, flows


def _build(where, factory, data):
    try:
        return factory(data)
    except ValidationError as exc:
        raise ValidationError(f"{where}.{exc.field}", exc.rule) from None


def _no_unknown_keys(where: str, mapping: dict, allowed: set):
    for key in mapping:
        if key not in allowed:
            raise ValidationError(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _target_side(counters) -> tuple[int, TargetHealth, list[str]]:
    """(copies dropped, the flow's target devices with their counters summed, problem texts)."""
    targets = {c.target.device: c.target for c in counters if c.target is not None}  # one per device, however many hooks
    dropped = sum(c.dropped for c in counters)
    device = ", ".join(sorted(targets))
    cut = "; ".join(dict.fromkeys(t.cut for t in targets.values() if t.cut))
    notes = list(dict.fromkeys(t.note for t in targets.values() if t.note))
    # dropped counts since the mirror was made: shown, but only a cut that holds now makes the flow degraded
    trouble = ([cut] if cut else []) + ([f"{dropped} copies dropped at target {device} since the mirror was made"] if dropped else []) + notes
    total = TargetHealth(device, sum(t.tx_dropped for t in targets.values()), sum(t.tx_errors for t in targets.values()), cut=cut)
    return dropped, total, trouble
