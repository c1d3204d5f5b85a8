"""The follower's queue: one entry per VM, oldest first; a full resync swallows the rest."""

import threading
import time

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
