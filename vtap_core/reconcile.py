"""Desired vs observed -> plan -> idempotent apply.

The truth is always the comparison, never a remembered event: a binding that
is desired and observed with the same spec is left alone, a missing one is
applied, one that differs or that nobody wants any more (an orphan of a
crashed run, a deleted session) is removed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from vtap_core.driver import Binding, Driver
from vtap_core.errors import NotFound, OperationFailed, TemporaryError, Unsupported, ValidationError
from vtap_core.model import TapFlow, TapSession
from vtap_core import selectors

log = logging.getLogger("vtap.reconcile")


@dataclass
class Plan:
    add: list[Binding] = field(default_factory=list)
    remove: list[Binding] = field(default_factory=list)
    keep: list[Binding] = field(default_factory=list)
    problems: list = field(default_factory=list)  # (session, flow, why) not realizable now
    members: dict = field(default_factory=dict)  # selector flow -> [selectors.Member] it taps now

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove

    def summary(self) -> dict:
        return {"added": len(self.add), "removed": len(self.remove), "kept": len(self.keep)}


def in_scope(binding: Binding, scope: str | None) -> bool:
    # Session-wide bindings (targets) are always looked at: a VM's mirror needs its target.
    return scope is None or binding.vm is None or binding.vm == scope


def diff(desired: list[Binding], observed: list[Binding], scope: str | None = None) -> Plan:
    plan = Plan()
    wanted = {b.key: b for b in desired if in_scope(b, scope)}
    found = {b.key: b for b in observed if in_scope(b, scope)}
    for key, binding in wanted.items():
        seen = found.get(key)
        if seen is None:
            plan.add.append(binding)
        elif seen.spec != binding.spec:
            plan.remove.append(seen)
            plan.add.append(binding)
        elif seen.broken:
            plan.add.append(binding)  # apply mends it in place (replacing it would cut what points at it)
        else:
            plan.keep.append(seen)
    plan.remove.extend(b for key, b in found.items() if key not in wanted)
    return plan


def one_look(driver: Driver):
    """Optional driver hook `one_look()`: a context in which the driver reads each platform table once,
    so a plan and the observe after it (status, reconcile) share one read instead of two."""
    look = getattr(driver, "one_look", None)
    return look() if look is not None else contextlib.nullcontext()


@contextlib.contextmanager
def focused(driver: Driver, scope: str | None):
    """Optional driver hook `focus(vm)`: a driver that can read one VM instead of all (kvm) is told, for
    this thread, which VM the reads inside are about (None: all). Yields whether the driver has the hook,
    which also says it plans each flow on its own, so the other VMs' members can be left out (vsphere's
    flows share their switch's session options: it plans them all)."""
    focus = getattr(driver, "focus", None)
    if focus is None:
        yield False
        return
    focus(scope)
    try:
        yield True
    finally:
        focus(None)


def desired_bindings(driver: Driver, sessions: list[TapSession], flows: list[TapFlow], problems: list | None = None, members: dict | None = None, scope: str | None = None) -> list[Binding]:
    """What the driver should have on the platform for these enabled sessions.

    A flow whose source vanished since it was added (VM undefined, interface
    deleted) must not stop every other flow from being kept right: when the
    whole plan fails, plan per flow and set the failing ones aside in
    `problems` as (session, flow, error). Selector flows are expanded to their
    member flows first (selectors.py); `members` receives who they are. With a
    `scope` (one VM; only for drivers that plan each flow on its own), the members
    on other VMs are not planned: diff() would not look at them, and a thousand of
    them cost more than the VM that changed.
    """
    active = [s for s in sessions if s.enabled]
    names = {s.name for s in active}
    expansion = selectors.expand(active, [f for f in flows if f.session in names], driver.inventory, selectors.cap(), scope)
    flows = expansion.flows
    if members is not None:
        members.update(expansion.members)
    for session, flow, why in expansion.problems:
        _note(problems, session, flow, why)
    try:
        return driver.plan(active, flows)
    except (ValidationError, NotFound, Unsupported):
        pass
    bindings: list[Binding] = []
    for session in active:
        in_session = [f for f in flows if f.session == session.name]
        try:
            bindings.extend(driver.plan([session], []))
        except (ValidationError, NotFound, Unsupported) as exc:
            _note(problems, session.name, None, exc)
            continue
        for flow in in_session:
            try:
                bindings.extend(b for b in driver.plan([session], [flow]) if b.flow == flow.name)
            except (ValidationError, NotFound, Unsupported) as exc:
                _note(problems, session.name, flow.name, exc)
    return bindings


def _note(problems, session, flow, exc):
    if problems is not None:
        problems.append((session, flow, str(exc)))
    log.warning("not realizable now: session %s%s: %s", session, f" flow {flow}" if flow else "", exc)


class FlowsFailed(OperationFailed):
    """Some flows could not be applied or removed; everything else was. `plan` is what was executed."""

    def __init__(self, plan: Plan, failed: list):
        self.plan = plan
        self.failed = failed  # [(session, flow or None, why)]
        super().__init__("; ".join(f"session {s}{f' flow {f}' if f else ''}: {why}" for s, f, why in failed))


def execute(driver: Driver, plan: Plan) -> None:
    """Remove first (filters before their targets), then add (targets before filters).

    One device's or VM's failure must not stop the others: a step that fails is
    done again flow by flow; what still fails becomes a problem of its flow in
    plan.problems, and FlowsFailed names them once everything else is done.
    """
    failed: list = []
    if plan.remove:
        _flow_by_flow_on_failure(driver.remove, sorted(plan.remove, key=lambda b: -b.order), failed)
    if plan.add:
        _flow_by_flow_on_failure(driver.apply, sorted(plan.add, key=lambda b: b.order), failed)
    if failed:
        plan.problems.extend(failed)
        raise FlowsFailed(plan, failed)


def _flow_by_flow_on_failure(step, bindings: list[Binding], failed: list) -> None:
    try:
        step(bindings)
        return
    except TemporaryError:
        raise  # the platform is busy, not wrong: the caller retries all of it
    except OperationFailed:
        pass
    groups: dict[tuple, list] = {}  # first appearance keeps the step's order (targets before filters on apply)
    for binding in bindings:
        groups.setdefault((binding.session, binding.flow), []).append(binding)
    for (session, flow), group in groups.items():
        try:
            step(group)
        except TemporaryError:
            raise
        except OperationFailed as exc:
            failed.append((session, flow, str(exc)))
            log.debug("session %s%s: %s", session, f" flow {flow}" if flow else "", exc)  # FlowsFailed reports it


def reconcile(driver: Driver, sessions: list[TapSession], flows: list[TapFlow], scope: str | None = None, desired: tuple | None = None) -> Plan:
    """desired: (bindings, problems, members) that desired_bindings gave for these sessions and flows,
    when the caller has just computed them (a change plans once, for prepare and reconcile; unscoped)."""
    with focused(driver, scope) as plans_each_flow, one_look(driver):
        narrow = scope if plans_each_flow else None
        if desired is None:
            desired = (desired_bindings(driver, sessions, flows, problems := [], members := {}, narrow), problems, members)
        bindings, problems, members = desired
        plan = diff(bindings, driver.observe(), scope)
    plan.problems = problems
    plan.members = members
    execute(driver, plan)
    return plan
