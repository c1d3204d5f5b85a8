"""`vtap agent`: one per host of a fleet, keeping this host's part of the shared desired state true.

It is the follower (full resync at start and every interval, the driver's
events as hints) plus two things a fleet needs: the store's watch as another
hint (a change made on any machine reaches this host at once) and a
heartbeat that keeps this host listed in `vtap hosts` under a lease; a host
whose agent died disappears when its lease ends.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from importlib.metadata import version

from vtap_core.follow import EVERYTHING, Follower, NoMetrics
from vtap_core.model import TapSession

log = logging.getLogger("vtap.agent")
COUNTERS = {"packets", "bytes", "dropped", "target_tx_dropped", "target_tx_errors"}
COUNTERS_EVERY = 10.0  # seconds between counter updates of one flow: never one etcd write per packet
REPEAT_EVERY = 600.0  # seconds before the same "not realizable now" line is logged again


class HealthMetrics(NoMetrics):
    """What the heartbeat tells the fleet about this host's last reconcile."""

    def __init__(self):
        self.last_reconcile = ""
        self.problems = 0
        self.reconciled = threading.Event()  # wakes the reporter: what this host observes may have changed

    def set_flows(self, desired: int, active: int) -> None:
        self.last_reconcile = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.reconciled.set()

    def observe_latency(self, seconds: float) -> None:
        self.reconciled.set()  # one VM reconciled

    def count_error(self) -> None:
        self.problems += 1
        self.reconciled.set()


class OncePerWhile(logging.Filter):
    """Lets each distinct message through once per `every` seconds.

    In a fleet a VM runs on one host, so every other agent finds its flows "not
    realizable now" (the VM is not here) at each status report, once a second:
    that is normal, and worth one line, not a line per flow per second.
    """

    def __init__(self, every: float = REPEAT_EVERY):
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, text = time.monotonic(), record.getMessage()
        if now - self._last.get(text, -self.every) < self.every:
            return False
        if len(self._last) > 10000:
            self._last.clear()  # bounded memory: forget and say things once more
        self._last[text] = now
        return True


class Agent:
    def __init__(self, client, host: str, interval: float = 30.0, ttl: int = 15):
        self.client = client
        self.host = host
        self.ttl = ttl
        self.health = HealthMetrics()
        self.follower = Follower(client, interval=interval, metrics=self.health)
        self._watch_ready = threading.Event()  # the store's watch has read the desired state

    def run(self, stop: threading.Event) -> None:
        self._beat()  # a store that has no hosts refuses here, before anything runs
        quiet = OncePerWhile()
        logging.getLogger("vtap.reconcile").addFilter(quiet)
        threads = [
            threading.Thread(target=self._heartbeat, args=(stop,), name="vtap-heartbeat", daemon=True),
            threading.Thread(target=self._watch_store, args=(stop,), name="vtap-store-watch", daemon=True),
            threading.Thread(target=self._report, args=(stop,), name="vtap-report", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            # The first resync reads the copy the store's watch keeps: one read of the desired state, not two.
            self._watch_ready.wait(self.ttl)
            self.follower.run(stop)
        finally:
            self.health.reconciled.set()  # the reporter sees stop now, not in COUNTERS_EVERY seconds
            for thread in threads:
                thread.join(timeout=5)
            logging.getLogger("vtap.reconcile").removeFilter(quiet)

    def run_once(self) -> None:
        self._beat()
        self.follower._work(EVERYTHING, 0.0)
        self._beat()

    def _beat(self):
        info = {
            "driver": self.client.driver_name,
            "version": version("vtap"),
            "last_reconcile": self.health.last_reconcile,
            "problems": self.health.problems,
        }
        self.client.store.heartbeat(self.host, info, self.ttl)

    def _heartbeat(self, stop: threading.Event) -> None:
        away = False
        while not stop.wait(self.ttl / 3):
            try:
                self._beat()
                if away:
                    log.info("store reachable again")
                    away = False
            except Exception as exc:
                if not away:  # one line when it starts, one when it ends
                    log.warning("store unreachable, keeping every tap and retrying: %s", exc)
                    away = True

    def _report(self, stop: threading.Event) -> None:
        """This host's flows as it observes them: after each reconcile at once, counters every COUNTERS_EVERY seconds.

        A flow this host has nothing to do with is inactive here and not reported; one that is
        this host's but cannot be realized (its interface or `port:` target is missing) is, with
        its problem: that is this host's verdict, shown by `status` on any machine.
        """
        shown: dict = {}  # flow -> (row as last written, when)
        while not stop.is_set():
            self.health.reconciled.wait(COUNTERS_EVERY)
            self.health.reconciled.clear()
            if stop.is_set():
                return
            try:
                rows = {r.flow: r.to_dict() for r in self.client.status_here() if r.state != "inactive" or r.problem}
            except Exception:
                continue  # the heartbeat says when the store is away
            now = time.monotonic()
            for flow, row in rows.items():
                last = shown.get(flow)
                counters_only = last is not None and {k: v for k, v in row.items() if k not in COUNTERS} == {k: v for k, v in last[0].items() if k not in COUNTERS}
                if counters_only and (row == last[0] or now - last[1] < COUNTERS_EVERY):
                    rows[flow] = last[0]  # keep what was written
                else:
                    shown[flow] = (row, now)
            try:
                self.client.store.report(self.host, rows)
            except Exception:
                continue

    def _watch_store(self, stop: threading.Event) -> None:
        for changes in self.client.store.watch_desired(stop):
            if not self._watch_ready.is_set():
                self._watch_ready.set()  # the follower's first resync comes next: no hint needed
                continue
            for hint in self._hints(changes):
                self.follower.hints.put(hint)

    def _hints(self, changes) -> set:
        """What to reconcile for these desired-state changes: nothing for flows only other hosts realize
        (another host's interface, a VM this host does not run), one VM for a VM flow, else everything."""
        if changes is None:
            return {EVERYTHING}
        hints = set()
        for item in (item for pair in changes for item in pair if item is not None):
            if isinstance(item, TapSession) or item.source.select or (item.source.interface and item.host in (None, self.host)):
                return {EVERYTHING}
            if item.source.vm:
                # The VMs the last reconcile saw here (one that arrived since has its own reconcile
                # coming, which reads this change too): no inventory read per change per host.
                vms = self.client.vms_here
                if vms is None:
                    vms = {ref: vm.uuid for vm in self.client.driver.inventory() for ref in (vm.uuid, vm.name)}
                if item.source.vm in vms:
                    hints.add(vms[item.source.vm] or EVERYTHING)
        return hints
