"""One applying follower per central manager (vCenter) in a fleet: election and fencing.

A driver whose platform is one central manager rather than each host's own says so
(`Features.central_manager`). With a store that can hold an election (etcd), `vtap follow`
then campaigns: the elected follower runs the Follower while its lease lives; the others
stand by (no reconcile, no vCenter watch) and campaign again when the leader's key goes.
Every apply and remove of the leader passes its fence first (a valid lease, and a store write
compared on its term), so a deposed leader applies nothing.

A command that changes desired state (`session`, `flow`, `apply`, `Client.reconcile`) is one
more would-be applier: while a follower leads, it only writes the store (the leader's store watch
applies the change) and waits a little for the leader's report of the flows it changed; while
no one leads, it campaigns once, applies fenced and resigns (`applying`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import threading
import time

from vtap_core.errors import VtapError
from vtap_core.follow import EVERYTHING

log = logging.getLogger("vtap.leader")
LEADER_TTL = 5  # seconds: a dead leader's successor starts within this (plus a watch round trip)
AUDIT_COMMAND = "follow (leader)"
REPORT_EVERY = 10.0  # seconds between the leader's reports when nothing was reconciled (counters)
UNSETTLED = ("missing", "partial")  # a flow's state before its leader has applied it


class NotLeader(VtapError):
    """This follower no longer leads: the apply was refused before it reached the platform."""


class FencedDriver:
    """The driver, with the election's fence before every apply and remove."""

    def __init__(self, driver, election):
        object.__setattr__(self, "_driver", driver)
        object.__setattr__(self, "_election", election)

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def __setattr__(self, name, value):  # e.g. the Follower's metrics: the driver's own
        setattr(self._driver, name, value)

    def apply(self, bindings):
        bindings = list(bindings)
        self._election.fence(AUDIT_COMMAND, {"apply": [b.key for b in bindings]})
        self._driver.apply(bindings)

    def remove(self, bindings):
        bindings = list(bindings)
        self._election.fence(AUDIT_COMMAND, {"remove": [b.key for b in bindings]})
        self._driver.remove(bindings)


def election_for(client, host: str, ttl: int = LEADER_TTL):
    """The election this follower must win before applying, or None (a per-host platform, or one host's store)."""
    description = client.driver.describe()
    if not description.features.central_manager:
        return None
    return client.store.election(description.connection.get("url") or description.name, host, ttl)


def run_elected(client, follower, election, stop: threading.Event) -> None:
    """Stand by until elected, follow while leading, stand by again when leadership ends."""
    client._driver = FencedDriver(client.driver, election)  # the reconciles below go through the fence
    reconciled = threading.Event()
    follower.metrics = Reconciled(follower.metrics, reconciled)
    while not stop.is_set():
        if not election.campaign(stop):
            break
        term = threading.Event()
        threads = [
            threading.Thread(target=_keep_leading, args=(election, term, stop), name="vtap-leader-lease", daemon=True),
            threading.Thread(target=_watch_store, args=(client, follower, term), name="vtap-store-watch", daemon=True),
            threading.Thread(target=_report, args=(client, election.host, reconciled, term), name="vtap-report", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            follower.run(term)
        finally:
            term.set()
            reconciled.set()  # the reporter sees the term's end now
            for thread in threads:
                thread.join(timeout=10)
            election.resign()  # stopping, or the lease is gone or doubtful: let a standby take over now
        if not stop.is_set():
            log.warning("lost leadership of %s: standing by", election.platform)


def reconcile_elected(client, election):
    """`follow --once`: one fenced full reconcile if no one else leads (then give it up), else None."""
    with applying(client, election) as leader:
        return None if leader is not None else client.reconcile()


@contextlib.contextmanager
def applying(client, election=None):
    """Who applies what this process is about to do to a central manager's platform.

    Yields None when this process does: no election is needed (one host's store, a per-host
    platform), it already leads (a follower's own reconciles), or it was elected just now for
    this command (its driver fenced, its lease kept alive, resigned at the end). Else yields the
    record {host, pid, platform, ...} of the follower that leads: that one applies.
    """
    if not client.store.shared or isinstance(client._driver, FencedDriver):
        yield None
        return
    election = election or election_for(client, client.host)
    if election is None:
        yield None
        return
    for _ in range(3):  # a leader that resigned between our try and our read: try again
        if election.campaign(threading.Event(), wait=False):
            break
        leader = _leader_of(client, election.platform)
        if leader is not None:
            yield leader
            return
    else:
        yield {"host": None, "platform": election.platform}
        return
    driver, client._driver = client.driver, FencedDriver(client.driver, election)
    done = threading.Event()
    keeper = threading.Thread(target=_keep_leading, args=(election, done, done), name="vtap-leader-lease", daemon=True)
    keeper.start()
    try:
        yield None
    finally:
        done.set()
        keeper.join(timeout=10)
        election.resign()
        client._driver = driver


def _leader_of(client, platform: str) -> dict | None:
    """The record of the follower that leads this platform for this client's driver, or None."""
    return next((r for r in client.store.leaders() if r.get("platform") == platform and r.get("driver") == client.driver_name), None)


def flow_spec(session, flow) -> str:
    """A digest of what one flow asks for (with its session): a report carrying it was made for exactly this."""
    return hashlib.sha256(json.dumps([session.to_dict(), flow.to_dict()], sort_keys=True).encode()).hexdigest()[:16]


def flow_specs(sessions, flows) -> dict:
    by_name = {s.name: s for s in sessions}
    return {f.name: flow_spec(by_name[f.session], f) for f in flows if f.session in by_name}


def await_report(client, leader: dict, before: tuple, after: tuple, wait: float) -> str:
    """What the elected follower made of a change this process stored: its report of each flow the change
    touched (made for the flow as it is now, and settled), or, after `wait` seconds, that it will apply it.
    A leader that dies meanwhile is followed by its successor's report; while no one leads, this process
    campaigns, and if elected applies the whole desired state itself (fenced, as `follow --once`)."""
    old, new = flow_specs(*before), flow_specs(*after)
    wanted = {name: spec for name, spec in new.items() if old.get(name) != spec}
    gone = set(old) - set(new)
    host = leader.get("host")
    if not wanted and not gone:
        return f"the elected follower on {host} applies it" if host else "an elected follower applies it"
    deadline = time.monotonic() + wait
    done = False
    while not done and time.monotonic() < deadline:
        try:
            host = (_leader_of(client, leader["platform"]) or {}).get("host")
            if host is None:
                plan = reconcile_elected(client, None)
                if plan is not None:
                    return f"no follower leads {leader['platform']} now: applied here ({len(plan.add)} platform objects added, {len(plan.remove)} removed)"
                continue  # one was elected meanwhile: wait for its report
            rows = {r["flow"]: r for r in client.store.observed() if r.get("host") == host}
        except VtapError as exc:  # the change is stored all the same: say so, not that nothing was changed
            return f"stored: an elected follower applies it (its report cannot be read now: {exc})"
        made = {n: rows[n] for n, spec in wanted.items() if n in rows and rows[n].get("spec") == spec}
        settled = all(r["state"] not in UNSETTLED or r.get("problem") for r in made.values())
        done = len(made) == len(wanted) and settled and not gone & set(rows)
        if not done:
            time.sleep(0.2)
    who = f"the elected follower on {host}" if host else "an elected follower"
    if not done:
        return f"stored: {who} will apply it (no report of it within {wait:g} s; `vtap status` shows its report)"
    if not made:
        return f"removed by {who}"
    states = [f"{n} {r['state']}" + (f" ({r['problem']})" if r.get("problem") else "") for n, r in sorted(made.items())]
    if len(states) > 5:
        states = [f"{k} {v}" for k, v in sorted(collections.Counter(r["state"] for r in made.values()).items())]
    return f"applied by {who}: {', '.join(states)}"


class Reconciled:
    """The follower's metrics, waking the leader's reporter after each reconcile."""

    def __init__(self, metrics, event: threading.Event):
        self._metrics, self._event = metrics, event

    def __getattr__(self, name):
        return getattr(self._metrics, name)

    def set_flows(self, desired: int, active: int) -> None:
        self._metrics.set_flows(desired, active)
        self._event.set()

    def observe_latency(self, seconds: float) -> None:
        self._metrics.observe_latency(seconds)
        self._event.set()

    def count_error(self) -> None:
        self._metrics.count_error()
        self._event.set()


def _report(client, host: str, reconciled: threading.Event, term: threading.Event) -> None:
    """The leader's view of every flow, in the store after each reconcile and every REPORT_EVERY s.

    Each row carries the spec of the flow it was made for (none when the flow changed while it
    was made), so a command that stored a change knows the row is about that change.
    """
    while not term.is_set():
        reconciled.wait(REPORT_EVERY)
        reconciled.clear()
        if term.is_set():
            return
        try:
            with client.lock():  # not in the middle of a reconcile
                before = flow_specs(*client.store.snapshot())
                rows = [r for r in client.status() if r.state != "orphan"]
                after = flow_specs(*client.store.snapshot())
            client.store.report(host, {r.flow: {**r.to_dict(), "spec": after.get(r.flow) if before.get(r.flow) == after.get(r.flow) else None} for r in rows})
        except Exception as exc:
            log.info("report not written (%s); the next reconcile tries again", exc)


def _keep_leading(election, term: threading.Event, stop: threading.Event) -> None:
    """Renew the lease every ttl/5 s; end the term when it cannot be shown alive or on stop."""
    while not term.is_set():
        if stop.is_set() or not election.keep_alive():
            term.set()
            return
        stop.wait(election.ttl / 5)


def _watch_store(client, follower, term: threading.Event) -> None:
    """A change of the desired state made on any machine is a hint to the leader at once (as for `vtap agent`)."""
    for _ in client.store.watch_desired(term):
        follower.hints.put(EVERYTHING)
