"""The follower behind `vtap follow`: keeps desired state true as VMs move.

Level-triggered: a full resync at start and every `interval` seconds; the
driver's events are only hints about where to look. Hints are coalesced per
VM (a burst of ten events for one VM is one reconcile) and worked off by a
single worker, so work for one VM is serialized. Temporary errors are
retried with backoff; anything else is logged and the next resync tries
again, except a store replaced, deleted, emptied or upgraded under the follower: that
stops it (StoreChanged) with the platform left as it is, since following
either file could remove mirrors someone still wants.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import tenacity

from vtap_core.errors import TemporaryError
from vtap_core.store import StoreChanged

log = logging.getLogger("vtap.follow")
EVERYTHING = None  # the hint "look at everything"


class NoMetrics:
    """What the follower reports; a driver or the CLI may pass a real exporter."""

    def observe_latency(self, seconds: float) -> None: ...

    def count_reconnect(self) -> None: ...

    def count_error(self) -> None: ...

    def set_flows(self, desired: int, active: int) -> None: ...


class HintQueue:
    """Pending hints, one entry per VM, oldest first; remembers when each arrived."""

    def __init__(self):
        self._pending: OrderedDict = OrderedDict()
        self._ready = threading.Condition()

    def put(self, hint) -> None:
        with self._ready:
            self._pending.setdefault(hint, time.monotonic())
            self._ready.notify()

    def take(self, timeout: float):
        """(hint, arrival time), or None when nothing came within timeout."""
        with self._ready:
            if not self._pending and not self._ready.wait_for(lambda: self._pending, timeout):
                return None
            if EVERYTHING in self._pending:
                # A full resync covers every VM that is waiting too.
                arrived = min(self._pending.values())
                self._pending.clear()
                return EVERYTHING, arrived
            return self._pending.popitem(last=False)


class Follower:
    def __init__(self, client, interval: float = 30.0, metrics=None, retries: int = 5):
        self.client = client
        self.interval = interval
        self.metrics = metrics or NoMetrics()
        self.hints = HintQueue()
        self.retries = retries
        self.resyncs = 0
        self._stop = threading.Event()  # run()'s: a stop ends retries and their waits at once

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        if hasattr(self.client.driver, "metrics"):
            self.client.driver.metrics = self.metrics  # drivers that reconnect (kvm) count it there
        watcher = threading.Thread(target=self._watch, args=(stop,), name="vtap-watch", daemon=True)
        watcher.start()
        try:
            self._work(EVERYTHING, time.monotonic())
            next_resync = time.monotonic() + self.interval
            while not stop.is_set():
                item = self.hints.take(timeout=max(0.0, min(next_resync - time.monotonic(), 0.5)))
                if item is not None:
                    self._work(*item)
                    if item[0] is EVERYTHING:
                        next_resync = time.monotonic() + self.interval
                elif time.monotonic() >= next_resync:
                    self._work(EVERYTHING, time.monotonic())
                    next_resync = time.monotonic() + self.interval
        finally:
            stop.set()  # the watcher too
            watcher.join(timeout=5)

    def _watch(self, stop: threading.Event) -> None:
        """Feed the driver's hints to the queue; if the watch breaks, resync and watch again."""
        while not stop.is_set():
            try:
                for hint in self.client.driver.watch(stop):
                    if stop.is_set():
                        return
                    self.hints.put(hint)
                return
            except Exception as exc:
                if stop.is_set():
                    return  # a watch broken by the stop itself: nothing to report
                self.metrics.count_error()
                log.warning("event watch failed, resyncing and watching again: %s", exc)
                self.hints.put(EVERYTHING)
                stop.wait(1.0)

    def _work(self, scope, arrived: float) -> None:
        stop = self._stop
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TemporaryError),
            wait=tenacity.wait_exponential(multiplier=0.2, max=10),
            # SIGTERM while the platform is away must not wait out the backoff (kill -9 was needed).
            stop=tenacity.stop_after_attempt(self.retries) | tenacity.stop_when_event_set(stop),
            sleep=stop.wait,
            reraise=True,
        )
        try:
            plan = retrying(self.client.reconcile, scope)
        except StoreChanged:
            self.metrics.count_error()
            raise
        except Exception as exc:
            if stop.is_set():
                return  # stopping: the attempt cut short is not a failure to report
            self.metrics.count_error()
            log.error("reconcile %s failed: %s", "everything" if scope is None else scope, exc)
            return
        if scope is EVERYTHING:
            self.resyncs += 1
            self.metrics.set_flows(len(plan.add) + len(plan.keep), len(plan.add) + len(plan.keep))
        else:
            self.metrics.observe_latency(time.monotonic() - arrived)
        if not plan.empty:
            log.info(
                "%s: applied %d, removed %d",
                "resync" if scope is None else f"vm {scope}",
                len(plan.add),
                len(plan.remove),
            )
