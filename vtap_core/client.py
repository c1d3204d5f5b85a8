"""The Python SDK. The `vtap` command line is a thin layer over this class.

    from vtap_core.client import Client

    with Client(driver="linux") as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="eth0", direction="in", filter="tcp port 80")
        for row in vtap.status():
            print(row.flow, row.state, row.packets)
        vtap.delete_session("web")

Every change is validated completely (model, then the driver's plan for the
would-be desired state) before anything is written. Then the writes that need
disk space come first, while nothing has changed yet: the driver's own record
of what it will add (the tc catalog), then the store. Only then is the
platform reconciled; if it fails half-way, the store is put back and the
platform reconciled to the previous state: all or nothing per call, and a
write that fails never costs a working mirror. Each change appends one audit
row. Whatever an interrupted run left that no desired flow wants (an orphan)
is shown by status and removed by every reconcile.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass, fields

from vtap_core import leader, reconcile, registry, selectors, yamlfile
from vtap_core.driver import TargetHealth
from vtap_core.errors import AlreadyExists, NotFound, OperationFailed, Unsupported, ValidationError, VtapError
from vtap_core.model import Source, TapFlow, TapSession, Target, evolve, member_name, parent_of
from vtap_core.redact import check_url_settings, redact
from vtap_core.safefile import open_private, write_private
from vtap_core.stores import Conflict, open_store
from vtap_core.store import host_name

CONFLICT_RETRIES = 20
LEADER_WAIT = 5.0  # seconds a change waits for the elected follower's report of it (central managers in a fleet)
SESSION_KEYS = {"name", "to", "snaplen", "sample", "enabled", "backend", "flows"}
FLOW_KEYS = {"name", "vm", "nic", "interface", "select", "direction", "filter", "host"}


@dataclass(slots=True)  # a row per flow: no __dict__ each
class FlowStatus:
    session: str
    flow: str
    source: str
    direction: str
    target: str
    state: str  # active | degraded (the target cannot take some copies now) | partial | missing | inactive (nothing to do here now) | disabled | orphan
    desired: int  # platform objects this flow needs now
    observed: int  # of those, present and right
    packets: int
    bytes: int
    problem: str = ""
    dropped: int = 0  # copies the target did not take (packets counts every copy made)
    target_tx_dropped: int = 0  # the target device's own transmit counters (all its traffic)
    target_tx_errors: int = 0
    capture_dropped: int = 0  # pcap target: copies that did not reach the file (ring full, sink drops), for the whole session
    members: list | None = None  # selector flows: each VM/NIC tapped now, with its own state and counters

    def to_dict(self) -> dict:
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        if self.members is None:
            del data["members"]
        return data


@dataclass
class Change:
    """What one call did: the plan that was executed, and a message for people."""

    message: str
    plan: reconcile.Plan

    def __str__(self):
        return self.message


@dataclass
class Stored(Change):
    """A change written to the store only: the elected follower (`leader`) applies it."""

    leader: dict
    before: tuple
    after: tuple


class Client:
    def __init__(self, driver: str = "linux", state: str | None = None, command: str | None = None,
                 store: str | None = None, store_settings: dict | None = None, host: str | None = None,
                 leader_wait: float = LEADER_WAIT, **settings):
        self.driver_name = registry.check_driver_name(driver)
        if not 0 <= leader_wait <= 3600:
            raise ValidationError("wait", f"{leader_wait:g} must be 0 to 3600 seconds")
        self.leader_wait = leader_wait
        self.host = host or host_name()  # this machine's name in a fleet: its interface flows are realized here
        self.vms_here: dict | None = None  # in a fleet: {UUID or name: UUID} of this host's VMs, as the last reconcile saw them
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
        if not self.store.has_session(name):
            return self._remove_leftovers("session", name, lambda b: b.session == name)

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

    def add_flow(self, session, vm=None, nic=None, interface=None, direction="both", filter=None, name=None, select=None, host=None) -> Change:
        source = Source(vm=vm, nic=nic, interface=interface, select=select)
        host = self._owner(source, host)
        if name is not None:
            TapFlow(name=name, session=session, source=source, direction=direction, filter=filter, host=host)
        created = {}

        def mutate(sessions, flows):
            if session not in sessions:
                raise NotFound(f"session {session!r} does not exist")
            flow_name = name or next_flow_name(session, flows)
            if flow_name in flows:
                raise AlreadyExists(f"flow {flow_name!r} already exists")
            flow = TapFlow(name=flow_name, session=session, source=source, direction=direction, filter=filter, host=host)
            flows[flow_name] = created["flow"] = flow
            return {"added flow": flow.to_dict()}

        change = self._change(f"flow add {session}", mutate, "flow {name} added to session " + session)
        change.message = change.message.replace("{name}", created["flow"].name, 1)
        change.flow = created["flow"]
        return change

    def delete_flow(self, name) -> Change:
        if not self.store.has_flow(name):
            return self._remove_leftovers("flow", name, lambda b: b.flow == name)

        def mutate(sessions, flows):
            if name not in flows:
                raise NotFound(f"flow {name!r} does not exist")
            return {"deleted flow": flows.pop(name).to_dict()}

        return self._change(f"flow delete {name}", mutate, f"flow {name} deleted")

    def apply_file(self, path: str, prune: bool = False) -> Change:
        with paused_gc():  # the cyclic GC doubles the load time of a large file
            document = yamlfile.load_file(path)  # libyaml; refuses non-UTF-8, aliases, deep nesting, duplicate keys
        return self.apply_document(document, prune=prune, source=redact(path))

    def apply_document(self, document, prune: bool = False, source: str = "document") -> Change:
        """Declarative: the sessions in the document, each with exactly its listed flows."""
        with paused_gc():
            wanted_sessions, wanted_flows = parse_document(document)
            wanted_flows = [self._owned(f) for f in wanted_flows]
        wanted_sessions = {n: self._absolute_pcap_path(s) for n, s in wanted_sessions.items()}

        def mutate(sessions, flows):
            replaced = set(wanted_sessions)
            if prune:
                replaced.update(n for n in sessions if n not in wanted_sessions)
                for name in [n for n in sessions if n not in wanted_sessions]:
                    del sessions[name]
            # One pass over the flows (not one per session): files hold tens of thousands.
            for flow in [f for f in flows.values() if f.session in replaced]:
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
        """Desired vs observed, applied here; an empty plan when an elected follower of this central manager applies instead."""
        self.store.check_writable()  # a store this vtap cannot fully read must not drive the platform
        with self.lock(), leader.applying(self) as elsewhere:
            if elsewhere is not None:
                return reconcile.Plan()
            self.store.check_identity()
            sessions, flows = self.store.snapshot()
            with paused_gc():  # as in status()
                with reconcile.focused(self.driver, scope):  # which VMs run here: only the one the events named is read again
                    here_sessions, here_flows = self._here(sessions, flows)
                plan = reconcile.reconcile(self.driver, here_sessions, self._about(scope, here_flows), scope)
            self._record_membership(plan.members, flows)
            return plan

    def _about(self, scope: str | None, flows: list) -> list:
        """The flows a reconcile about one VM plans: that VM's, and every selector or interface flow.

        Only for drivers that plan each flow on its own (those with focus(), see reconcile.reconcile),
        and where the last _here() knows this host's VMs: a VM that starts on a host of a hundred
        plans its own flows, not the hundred of the others (diff() would not look at them).
        """
        if scope is None or self.vms_here is None or getattr(self.driver, "focus", None) is None:
            return flows
        return [f for f in flows if not f.source.vm or self.vms_here.get(f.source.vm) == scope]

    def flow_members(self, name: str) -> list[selectors.Member]:
        """Who a selector flow taps now and why (`vtap flow show`)."""
        flow = next((f for f in self.store.flows() if f.name == name), None)
        if flow is None:
            raise NotFound(f"flow {name!r} does not exist")
        if not flow.source.select:
            return []
        session = self.store.session(flow.session)
        return selectors.members_of(flow, session, self.driver.inventory(), cap=1 << 62)

    # status ---------------------------------------------------------------

    def status(self) -> list[FlowStatus]:
        with paused_gc():  # desired and observed bindings of every flow: many objects, no cycles
            return self._status()

    def status_here(self) -> list[FlowStatus]:
        """status() without the rows of flows only other hosts realize (inactive here): what an agent reports.

        A fleet's 10,000 flows are 100 here: the others' rows cost an agent most of its time.
        """
        with paused_gc():
            return self._status(here_only=True)

    def _status(self, here_only: bool = False) -> list[FlowStatus]:
        sessions = {s.name: s for s in self.store.sessions()}
        flows = self.store.flows()
        problems: list = []
        members: dict = {}
        here_sessions, here_flows = self._here(list(sessions.values()), flows)
        mine = {f.name for f in here_flows}  # another host's flow has no problem here: its host says
        with reconcile.one_look(self.driver):
            desired = reconcile.desired_bindings(self.driver, here_sessions, here_flows, problems, members)
            observed = {b.key: b for b in self.driver.observe()}
        why = {(s, parent_of(f)): text for s, f, text in problems}
        by_flow: dict = {}
        for binding in desired:
            by_flow.setdefault((binding.session, binding.flow), []).append(binding)
        # Drivers that keep it say why a flow's last apply failed (shown while it is not active).
        apply_problems = getattr(self.driver, "apply_problems", None)
        failed = {(s, parent_of(f)): text for s, f, text in apply_problems()} if apply_problems else {}
        rows = []
        wanted = {b.key for b in desired}
        orphans: dict = {}
        for binding in observed.values():
            if binding.key not in wanted:
                orphans.setdefault((binding.session, binding.flow or "-"), []).append(binding)
        if here_only:
            flows = [f for f in flows if f.name in mine or not sessions[f.session].enabled]
        # The session's own target bindings (a pcap sink) count what was lost for all its flows.
        capture_dropped = {name: sum(observed[b.key].counters.dropped for b in by_flow.get((name, None), []) if b.key in observed and observed[b.key].counters is not None) for name in sessions}
        target_text = {name: str(session.target) for name, session in sessions.items()}
        # A session's own target objects (a tunnel device, a pcap sink) carry the copies of all its flows.
        targets_trouble = {name: _target_trouble(by_flow.get((name, None), []), observed) for name in sessions}
        for flow in flows:
            session = sessions[flow.session]
            row = _flow_state(session, by_flow.get((flow.session, flow.name), []), observed, targets_trouble[flow.session])
            if flow.source.select is not None:
                member_rows = [
                    {"vm": m.vm, "name": m.vm_name, "nic": m.nic, "host": m.host,
                     **_flow_state(session, by_flow.get((flow.session, member_name(flow.name, m.vm, m.nic)), []), observed, targets_trouble[flow.session])}
                    for m in members.get(flow.name, [])
                ]
                row = _sum_members(session, member_rows)
            problem = "" if flow.name not in mine else _problem_of(flow, why) or (_failure_of(flow, failed) if row["state"] in ("partial", "missing") else "")
            trouble = row.pop("trouble")
            rows.append(
                FlowStatus(
                    session=flow.session,
                    flow=flow.name,
                    source=str(flow.source),
                    direction=flow.direction.value,
                    target=target_text[flow.session],
                    problem="; ".join(p for p in (problem, *trouble) if p),
                    members=member_rows if flow.source.select is not None else None,
                    **row,
                    capture_dropped=capture_dropped[flow.session],
                )
            )
        rows.extend(_orphan_row(session, flow, found) for (session, flow), found in sorted(orphans.items()))
        return rows

    # internals ------------------------------------------------------------

    def _owner(self, source: Source, host: str | None) -> str | None:
        """The host an interface flow belongs to: the one named, else this one.

        A one-host store keeps no host (every flow in it is this host's) and refuses another's.
        """
        if host is not None and not source.interface:
            raise ValidationError("host", "only an interface flow names a host (a VM is found on whichever host runs it)")
        here = self.host
        if not source.interface:
            return None
        if self.store.shared:
            return host or here
        if host not in (None, here):
            raise ValidationError("host", f"{host!r} is not this host ({here}): this store is one host's; flows of other hosts need a fleet's store (--store etcd://...)")
        return None

    def _owned(self, flow: TapFlow) -> TapFlow:
        host = self._owner(flow.source, flow.host)
        return flow if host == flow.host else evolve(flow, host=host)

    def _here(self, sessions: list, flows: list) -> tuple[list, list]:
        """What this host realizes: its own interface flows, and the VM flows of VMs it runs.

        One host's store has every flow here. In a fleet, a VM flow is another host's while its VM
        is not in this host's inventory, and a session is planned only where it has a flow: its
        target (a port, a tunnel) is made and checked on the hosts that mirror into it, never on
        an admin machine that has no such device. A central manager (vCenter) is the whole platform
        wherever it is reached from: all of it is here, and checked as on one host.
        """
        flows = [f for f in flows if f.host in (None, self.host)]
        if self.store.shared and not self.driver.describe().features.central_manager:
            if any(f.source.vm for f in flows):
                self.vms_here = {ref: vm.uuid for vm in self.driver.inventory() for ref in (vm.uuid, vm.name)}
                flows = [f for f in flows if not f.source.vm or f.source.vm in self.vms_here]
            used = {f.session for f in flows}
            sessions = [s for s in sessions if s.name in used]
        return sessions, flows

    def _absolute_pcap_path(self, session: TapSession) -> TapSession:
        if session.target.kind != "pcap" or os.path.isabs(session.target.path):
            return session
        return evolve(session, target=evolve(session.target, path=os.path.abspath(session.target.path)))

    def _change(self, command: str, mutate, message: str) -> Change:
        """_change_once, again from a fresh read while another writer of a shared store commits first."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                with paused_gc():  # as in status()
                    change = self._change_once(command, mutate, message)
                if isinstance(change, Stored):  # outside the lock: the leader may be a process of this host
                    return Change(f"{message}; {leader.await_report(self, change.leader, change.before, change.after, self.leader_wait)}", change.plan)
                return change
            except Conflict:
                time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # spread the retries of racing writers
        raise OperationFailed(f"{command}: the desired state kept changing under it ({CONFLICT_RETRIES} tries); nothing was changed, try again")

    def _change_once(self, command: str, mutate, message: str) -> Change:
        """Validate, write, reconcile; on failure put store and platform back."""
        self.store.check_writable()
        with self.lock(), contextlib.ExitStack() as elected:
            self.store.check_identity()
            before_sessions, before_flows = self.store.snapshot()
            sessions = {s.name: s for s in before_sessions}
            flows = {f.name: f for f in before_flows}
            change = mutate(sessions, flows)
            touched = _touched_sessions(change, sessions)
            self._validate(sessions, flows, touched, {f.name: f for f in before_flows})
            after = (list(sessions.values()), list(flows.values()))
            # A central manager's elected follower applies the change itself; else this process does, fenced, until it ends.
            elsewhere = elected.enter_context(leader.applying(self))
            prepared = None
            try:
                # Space-dependent writes before the platform is touched: a full disk fails here, changing nothing.
                prepared = self._prepare(*after)
                with self.store.transaction():
                    self.store.replace_all(*after)
                    self.store.record(self.command if self.command != "sdk" else f"sdk: {command}", change)
            except Conflict:
                raise  # someone else committed first: _change reads again
            except OperationFailed as exc:
                raise OperationFailed(f"{command} failed, nothing was changed: {exc}") from None
            if elsewhere is not None:
                return Stored(message, reconcile.Plan(), elsewhere, (before_sessions, before_flows), after)
            try:
                plan = self._realize(*after, prepared=prepared)
            except reconcile.FlowsFailed as exc:
                if any(_changed_by(session, parent_of(flow), before_sessions, before_flows, *after) for session, flow, _why in exc.failed):
                    self._roll_back(before_sessions, before_flows)
                    raise OperationFailed(f"{command} failed and was rolled back: {exc}") from exc
                plan = exc.plan  # only flows this call left as they were failed: theirs to show in status
            except Exception as exc:
                self._roll_back(before_sessions, before_flows)
                why = str(exc) if isinstance(exc, VtapError) else f"{type(exc).__name__}: {exc}"
                raise OperationFailed(f"{command} failed and was rolled back: {why}") from exc
        change_message = self._describe(message, plan)
        # A driver that applies only where a VM runs says where this change took effect (proxmox).
        placement = getattr(self.driver, "placement", None)
        note = placement([f for f in flows.values() if f.session in touched]) if placement and touched else ""
        return Change(f"{change_message}; {note}" if note else change_message, plan)

    def _realize(self, sessions, flows, prepared: tuple | None = None) -> reconcile.Plan:
        """prepared: what _prepare chose and planned for these sessions and flows (both again when None)."""
        # Drivers whose other hosts need the desired state too (proxmox: every node) publish it first.
        publish = getattr(self.driver, "publish_desired", None)
        if publish is not None:
            publish(sessions, flows)
        here, desired = prepared if prepared is not None else (self._here(sessions, flows), None)
        plan = reconcile.reconcile(self.driver, *here, desired=desired)
        self._record_membership(plan.members, flows)
        return plan

    def _record_membership(self, members: dict, flows) -> None:
        """One audit row per VM that joined or left a selector flow since the last reconcile."""
        path = os.path.join(self.store.state_dir, f"selectors-{self.driver_name}.json")
        selector_flows = {f.name for f in flows if f.source.select}
        before = {k: v for k, v in _read_private_json(path).items() if k in selector_flows or k in members}
        after = {flow: {f"{m.vm}#{m.nic}": f"{m.vm_name}: {m.why}" for m in found} for flow, found in members.items()}
        # Flows deleted since: their members left with them (the deletion is audited already).
        after.update({flow: {} for flow in before if flow not in selector_flows})
        changes = selectors.membership_changes(before, after)
        if not changes:
            return
        with self.store.transaction():
            self.store.record(f"{self.command}: selector membership" if self.command != "sdk" else "sdk: selector membership", {"members": changes})
        write_private(path, json.dumps({k: v for k, v in after.items() if k in selector_flows}, sort_keys=True))

    def _validate(self, sessions: dict, flows: dict, touched: set[str], before: dict):
        """The driver must be able to realize what this call touches, beside everything else.

        Flows already in the store that cannot be realized now (their interface was
        deleted since) are problems shown by status, not this call's fault: they never
        block adding or changing other flows.
        """
        if not touched:
            return
        mine = [f for f in flows.values() if f.session in touched]
        for name in touched:
            self.driver.check_features(sessions[name], [f for f in mine if f.session == name])
        new = {f.name for f in mine if before.get(f.name) != f}
        # Selector flows are planned as the members they have now; a new one over the cap is this call's fault.
        expanded = selectors.expand(list(sessions.values()), list(flows.values()), self.driver.inventory, selectors.cap())
        for session, flow, why in expanded.problems:
            if flow in new:
                raise ValidationError("select", f"flow {flow}: {why.split(': ', 1)[-1]}")
        everything = expanded.flows
        new |= {f.name for f in everything if parent_of(f.name) in new}
        # Only what this host realizes is checked here: another host's agent checks its own devices.
        self.driver.plan(*self._here([sessions[n] for n in touched], [f for f in everything if f.name in new]))
        if len(touched) == len(sessions) and all(f.name in new for f in everything):
            return  # that was the whole desired state
        try:
            self.driver.plan(*self._here(list(sessions.values()), everything))
            return
        except (ValidationError, NotFound, Unsupported) as exc:
            conflict = exc
        realizable = [f for f in everything if f.name in new or self._plans(sessions[f.session], f)]
        try:
            self.driver.plan(*self._here(list(sessions.values()), realizable))
            return
        except (ValidationError, NotFound, Unsupported) as exc:
            conflict = exc
        # Either the change clashes with the rest (a VNI used twice), or the rest
        # cannot be planned on its own (a target vanished): only the first is this call's fault.
        others = [s for s in sessions.values() if s.name not in touched]
        try:
            self.driver.plan(*self._here(others, [f for f in realizable if f.session not in touched]))
        except (ValidationError, NotFound, Unsupported):
            return
        raise conflict

    def _plans(self, session: TapSession, flow: TapFlow) -> bool:
        try:
            self.driver.plan(*self._here([session], [flow]))
        except (ValidationError, NotFound, Unsupported):
            return False
        return True

    def _prepare(self, sessions, flows) -> tuple | None:
        """Drivers that keep a record of what they put on the platform (tc: the catalog) write it now.

        Returns what this host realizes (_here) and (bindings, problems, members) of the plan it made,
        for the reconcile that follows.
        """
        prepare = getattr(self.driver, "prepare", None)
        if prepare is None:
            return None
        here = self._here(sessions, flows)
        desired = (reconcile.desired_bindings(self.driver, *here, problems := [], members := {}), problems, members)
        prepare(desired[0])
        return here, desired

    def _roll_back(self, sessions, flows):
        try:
            with self.store.transaction():
                self.store.replace_all(sessions, flows)
                self.store.record(f"rollback: {self.command}", {"restored sessions": len(sessions), "restored flows": len(flows)})
        except OperationFailed as exc:
            # The platform still goes back to the previous state: a failed write must not cost working mirrors.
            print(f"vtap: the store could not be put back and still holds the failed change ({exc}): free the space, then run `vtap apply` or `vtap follow`", file=sys.stderr)
        try:
            self._realize(sessions, flows)
        except Exception as exc:  # the original error is the one to report
            print(f"vtap: rollback incomplete, run `vtap apply` or `vtap follow` to repair: {exc}", file=sys.stderr)

    def _remove_leftovers(self, kind: str, name: str, belongs) -> Change:
        """Delete of a name the store no longer has: a run killed part way may have left its mirrors.

        Removing them is a reconcile (which removes every orphan of this store);
        without any, the name simply does not exist.
        """
        # Only a name the audit log knows can have left something (a plain typo reads nothing).
        if not self.store.in_audit(name) or not any(belongs(b) for b in self.driver.observe()):
            raise NotFound(f"{kind} {name!r} does not exist")
        self.store.check_writable()
        with self.lock(), leader.applying(self) as elsewhere:
            if elsewhere is not None:  # its reconciles remove every orphan
                return Change(f"{kind} {name} was already deleted; the elected follower on {elsewhere['host']} removes what an interrupted run left", reconcile.Plan())
            self.store.check_identity()
            sessions, flows = self.store.snapshot()
            plan = self._realize(sessions, flows)
            with self.store.transaction():
                self.store.record(
                    self.command if self.command != "sdk" else f"sdk: {kind} delete {name}",
                    {f"removed leftovers of {kind}": name, "removed": len(plan.remove)},
                )
        return Change(f"{kind} {name} was already deleted; removed what an interrupted run left ({len(plan.remove)} platform objects removed)", plan)

    @staticmethod
    def _describe(message: str, plan: reconcile.Plan) -> str:
        if plan.add or plan.remove:
            return f"{message} ({len(plan.add)} platform objects added, {len(plan.remove)} removed)"
        return f"{message} (nothing to change on this host now)"


COUNTS = ("desired", "observed", "packets", "bytes", "dropped", "target_tx_dropped", "target_tx_errors")


def _target_trouble(bindings: list, observed: dict) -> list[str]:
    """Why a session's own target objects do not carry copies now ([] when they do)."""
    out = []
    for binding in bindings:
        seen = observed.get(binding.key)
        name = binding.get("device") or binding.key
        if seen is None or seen.spec != binding.spec:
            out.append(f"target {name} is missing or not as planned (reconcile puts it right)")
        elif seen.broken:
            out.append(f"target {name}: {seen.broken}")
    return out


def _flow_state(session: TapSession, mine: list, observed: dict, target_trouble: list = ()) -> dict:
    """state, desired, observed, counters and target-side trouble of one flow's bindings; target_trouble:
    what is wrong with the session's own target objects (then the flow's copies reach nothing: not active)."""
    present, counters, packets, nbytes = 0, [], 0, 0  # one pass: 10,000 flows a status
    for binding in mine:
        seen = observed.get(binding.key)
        if seen is not None and seen.spec == binding.spec and not seen.broken:
            present += 1
            if seen.counters is not None:
                counters.append(seen.counters)
                packets += seen.counters.packets
                nbytes += seen.counters.bytes
    if not session.enabled:
        state = "disabled"
    elif not mine:
        state = "inactive"
    elif present == len(mine):
        state = "active"
    else:
        state = "partial" if present else "missing"
    dropped, target, trouble = _target_side(counters)
    if state in ("active", "partial") and target_trouble:
        state, trouble = "partial", [*target_trouble, *trouble]
    if state == "active" and target.cut:
        state = "degraded"  # active means delivered: some of these copies cannot be
    return {"state": state, "desired": len(mine), "observed": present, "packets": packets, "bytes": nbytes,
            "dropped": dropped, "target_tx_dropped": target.tx_dropped, "target_tx_errors": target.tx_errors, "trouble": trouble}


def _sum_members(session: TapSession, members: list[dict]) -> dict:
    """A selector flow's own row: its members added up (active when every member is)."""
    total = {key: sum(m[key] for m in members) for key in COUNTS}
    states = {m["state"] for m in members if m["state"] != "inactive"}
    if not session.enabled:
        state = "disabled"
    elif not states:
        state = "inactive"
    elif states == {"active"}:
        state = "active"
    elif states <= {"active", "degraded"}:
        state = "degraded"
    else:
        state = "partial" if states & {"active", "degraded", "partial"} else "missing"
    trouble = list(dict.fromkeys(t for m in members for t in m.pop("trouble")))
    return {"state": state, **total, "trouble": trouble}


def _orphan_row(session: str, flow: str, found: list) -> FlowStatus:
    counters = [b.counters for b in found if b.counters is not None]
    devices = sorted({str(b.get("device")) for b in found if b.get("device")})
    return FlowStatus(
        session=session,
        flow=flow,
        source=", ".join(devices) or "-",
        direction="-",
        target="-",
        state="orphan",
        desired=0,
        observed=len(found),
        packets=sum(c.packets for c in counters),
        bytes=sum(c.bytes for c in counters),
        problem="wanted by nothing in the store (left by an interrupted vtap run, or a tcx mirror whose device went away): the next vtap change or `vtap follow` removes it",
    )


def _touched_sessions(change: dict, sessions: dict) -> set[str]:
    names = set()
    for key in ("created session", "added flow"):
        if key in change:
            names.add(change[key].get("session") or change[key]["name"])
    names.update(change.get("sessions", []))
    return {n for n in names if n in sessions}


def _problem_of(flow: TapFlow, problems: dict) -> str:
    return problems.get((flow.session, flow.name), problems.get((flow.session, None), ""))


def _failure_of(flow: TapFlow, failed: dict) -> str:
    # The session's target failing is the cause of its flows' failures: name it first.
    return failed.get((flow.session, None)) or failed.get((flow.session, flow.name), "")


def _changed_by(session: str, flow: str | None, before_sessions, before_flows, sessions, flows) -> bool:
    """Whether a call that went from before_* to sessions/flows changed this session (and flow)."""
    def same(old, new, name):
        return {x.name: x for x in old}.get(name) == {x.name: x for x in new}.get(name)

    return not same(before_sessions, sessions, session) or (flow is not None and not same(before_flows, flows, flow))


def _read_private_json(path: str) -> dict:
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd) as handle:
        try:
            data = json.load(handle)
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}


def next_flow_name(session: str, flows: dict) -> str:
    """`<session>-<n>` with the smallest n not taken."""
    n = 1
    while f"{session}-{n}" in flows:
        n += 1
    return f"{session}-{n}"


@contextlib.contextmanager
def paused_gc():
    """Python's cyclic GC off for a while: loading a large file makes millions of objects, none of them
    in a cycle, and the collector's passes over them double the time of a 40,000-flow apply file
    (status, reconcile and changes over thousands of flows make them too)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
    every_flow: set = set()  # names across sessions: flow names are unique in a store
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
        unnamed = 1  # the smallest n that may be free for "<session>-<n>"; only grows as names are taken
        for j, flow_entry in enumerate(flow_entries or []):
            flow_where = f"{where}.flows[{j}]"
            if not isinstance(flow_entry, dict):
                raise ValidationError(flow_where, "must be a mapping")
            _no_unknown_keys(flow_where, flow_entry, FLOW_KEYS)
            flow_data = dict(flow_entry, session=session.name)
            if "name" not in flow_data:
                while f"{session.name}-{unnamed}" in taken:
                    unnamed += 1
                flow_data["name"] = f"{session.name}-{unnamed}"
            flow = _build(flow_where, TapFlow.from_dict, flow_data)
            if flow.name in every_flow:
                raise ValidationError(flow_where, f"flow {flow.name!r} is listed twice")
            every_flow.add(flow.name)
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
    first = counters[0].target if counters else None
    if first is not None and not first.cut and not first.note and all(c.target is first and not c.dropped for c in counters):
        return 0, first, []  # the usual flow: its hooks share one target's health, nothing wrong (10,000 rows a status)
    targets, dropped = {}, 0
    for counter in counters:
        dropped += counter.dropped
        if counter.target is not None:
            targets[counter.target.device] = counter.target  # one per device, however many hooks
    device = ", ".join(sorted(targets))
    cut = "; ".join(dict.fromkeys(t.cut for t in targets.values() if t.cut))
    notes = list(dict.fromkeys(t.note for t in targets.values() if t.note))
    # dropped counts since the mirror was made: shown, but only a cut that holds now makes the flow degraded
    trouble = ([cut] if cut else []) + ([f"{dropped} copies dropped at target {device} since the mirror was made"] if dropped else []) + notes
    total = TargetHealth(device, sum(t.tx_dropped for t in targets.values()), sum(t.tx_errors for t in targets.values()), cut=cut)
    return dropped, total, trouble
