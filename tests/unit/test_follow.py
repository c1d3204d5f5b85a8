"""The follower's queue: one entry per VM, oldest first; a full resync swallows the rest."""

import threading
import time

from vtap_core.errors import TemporaryError
from vtap_core.follow import EVERYTHING, HintQueue


def test_hints_coalesce_per_vm_in_arrival_order():
    queue = HintQueue()
    for hint in ("vm-a", "vm-b", "vm-a", "vm-a", "vm-c"):
        queue.put(hint)
    taken = [queue.take(0)[0] for _ in range(3)]
    assert taken == ["vm-a", "vm-b", "vm-c"]
    assert queue.take(0.01) is None


def test_everything_covers_waiting_vms_and_keeps_oldest_arrival():
    queue = HintQueue()
    queue.put("vm-a")
    first = time.monotonic()
    queue.put(EVERYTHING)
    hint, arrived = queue.take(0)
    assert hint is EVERYTHING and arrived <= first
    assert queue.take(0.01) is None


def test_take_wakes_up_on_put():
    queue = HintQueue()
    threading.Timer(0.05, queue.put, args=("vm-z",)).start()
    started = time.monotonic()
    assert queue.take(5)[0] == "vm-z"
    assert time.monotonic() - started < 1


class _UnreachablePlatform:
    """A client whose platform is away: every reconcile is a TemporaryError (the follower retries it)."""

    class driver:
        @staticmethod
        def watch(stop):
            stop.wait()
            return iter(())

    def __init__(self):
        self.attempts = 0

    def reconcile(self, scope=None):
        self.attempts += 1
        raise TemporaryError("the platform is away")


def test_a_stop_ends_the_retry_backoff_at_once_and_logs_no_failure(caplog):
    from vtap_core.follow import Follower

    client = _UnreachablePlatform()
    follower = Follower(client, interval=30, retries=12)  # backing off up to 10 s a retry: ~90 s in all
    stop = threading.Event()
    runner = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    runner.start()
    while client.attempts < 3:  # backing off now
        time.sleep(0.01)
    stop.set()
    runner.join(5)
    assert not runner.is_alive(), "the follower slept out its retries after the stop"
    assert client.attempts < 12
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
