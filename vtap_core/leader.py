"""One applying follower per central manager (vCenter) in a fleet: election and fencing.

A driver whose platform is one central manager rather than each host's own says so
(`Features.central_manager`). With a store that can hold an election (etcd), `vtap follow`
then campaigns: the elected follower runs the Follower while its lease lives; the others
stand by (no reconcile, no vCenter watch) and campaign again when the leader's key goes.
Every apply and remove of the leader passes its fence first (a valid lease, and a store write
compared on its term), so a deposed leader applies nothing.
"""

from __future__ import annotations

import logging
import threading

from vtap_core.errors import VtapError
from vtap_core.follow import EVERYTHING

log = logging.getLogger("vtap.leader")
LEADER_TTL = 5  # seconds: a dead leader's successor starts within this (plus a watch round trip)
AUDIT_COMMAND = "follow (leader)"


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
    while not stop.is_set():
        if not election.campaign(stop):
            break
        term = threading.Event()
        threads = [
            threading.Thread(target=_keep_leading, args=(election, term, stop), name="vtap-leader-lease", daemon=True),
            threading.Thread(target=_watch_store, args=(client, follower, term), name="vtap-store-watch", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            follower.run(term)
        finally:
            term.set()
            for thread in threads:
                thread.join(timeout=10)
            election.resign()  # stopping, or the lease is gone or doubtful: let a standby take over now
        if not stop.is_set():
            log.warning("lost leadership of %s: standing by", election.platform)


def reconcile_elected(client, election):
    """`follow --once`: one fenced full reconcile if no one else leads (then give it up), else None."""
    if not election.campaign(threading.Event(), wait=False):
        return None
    client._driver = FencedDriver(client.driver, election)
    try:
        return client.reconcile()
    finally:
        election.resign()


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
