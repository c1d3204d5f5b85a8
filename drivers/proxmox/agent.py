"""The node agent: every interval, poll the cluster and make this node's taps match the desired state.

One cycle is: /cluster/resources + this node's task list (plus the configs of VMs that changed), the
desired state (shared document, see desired.py), then one reconcile against the kernel. A VM that
arrived is tapped in the first cycle after PVE lists it here; one that left (migrated, stopped) loses
its tap in the same way. Trouble (API 5xx, a node offline, an expired ticket, a timeout) is logged as
one line when it starts and one when it clears; the next cycle simply tries again.
"""

from __future__ import annotations

import logging
import threading
import time

from vtap_core import reconcile
from vtap_core.errors import VtapError

log = logging.getLogger("vtap.proxmox.agent")


class StoreState:
    """The local store as the desired state (a single node, or no shared document configured)."""

    def __init__(self, store):
        self.store = store

    def load(self):
        return self.store.snapshot()


class Agent:
    def __init__(self, driver, desired_state, interval: float = 10.0, lock=None):
        self.driver = driver
        self.desired = desired_state
        self.interval = interval
        self.lock = lock  # serializes with CLI commands reconciling the same store
        self.trouble: str | None = None
        self.cycles = 0
        self.last_plan = None

    def cycle(self):
        """One poll + reconcile; returns the executed plan."""
        if self.cycles == 0:
            self.driver.check_node()
        self.driver.refresh()
        sessions, flows = self.desired.load()
        if self.lock is not None:
            with self.lock():
                plan = reconcile.reconcile(self.driver, sessions, flows)
        else:
            plan = reconcile.reconcile(self.driver, sessions, flows)
        self.cycles += 1
        self.last_plan = plan
        if not plan.empty:
            log.info("node %s: applied %d, removed %d, kept %d", self.driver.node, len(plan.add), len(plan.remove), len(plan.keep))
        return plan

    def run(self, stop: threading.Event, once: bool = False) -> None:
        """Cycle every interval until stop is set; with once, one cycle whose error is raised."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.cycle()
            except VtapError as exc:
                if once:
                    raise
                # Even a permanent error (a revoked token) is retried: a daemon cannot fix it by exiting.
                self._trouble(exc)
            else:
                if self.trouble is not None:
                    log.info("node %s: recovered (%s)", self.driver.node, self.trouble)
                    self.trouble = None
            if once:
                return
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _trouble(self, exc):
        text = str(exc).splitlines()[0]
        if self.trouble is None:
            log.warning("node %s: cycle failed, retrying every %ss until it works: %s", self.driver.node, self.interval, text)
        self.trouble = text
