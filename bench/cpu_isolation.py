"""One CPU to the benchmark alone for a while, and what happened on it meanwhile.

`Isolated(cpu)` moves every task that may move (sched_setaffinity on each
thread) and every IRQ that may move (/proc/irq/N/smp_affinity) off `cpu`, and
puts them all back afterwards, also on Ctrl-C, SIGTERM or an exception. Tasks
forked during the window inherit the narrowed mask from their parent: they get
their ancestor's saved mask back. Unbound kernel threads and
workqueues move too (/sys/devices/virtual/workqueue/cpumask). Left alone:
per-CPU kernel threads (they cannot move), and the session machinery that runs
this machine (PID 1 and the processes it starts directly are not ours to
touch; the shells they start are moved).

`CpuClock(cpu)` reads what the data CPU did: steal time from /proc/stat and the
run time of its ksoftirqd (ns, /proc/PID/schedstat), which takes the receive
backlog off the sender when softirqs run too long in its context.
"""

from __future__ import annotations

import os
import signal

WORKQUEUES = "/sys/devices/virtual/workqueue/cpumask"  # where unbound workqueues' workers may run


def _tasks():
    """(pid, tid) of every thread on the machine."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    yield int(pid), int(tid)
            except OSError:
                continue


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _is_kernel_thread(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[6]) & 0x00200000 != 0  # PF_KTHREAD
    except (OSError, ValueError, IndexError):
        return True


def _cpulist_mask(cpus) -> str:
    return format(sum(1 << c for c in cpus), "x")


class Isolated:
    """`with Isolated(cpu):` nothing else runs on cpu that can run elsewhere."""

    def __init__(self, cpu: int):
        self.cpu = cpu
        self.others = set(range(os.cpu_count())) - {cpu}
        self.tasks: dict[int, set] = {}  # tid -> its affinity before
        self.irqs: dict[str, str] = {}  # /proc/irq/N/smp_affinity -> its mask before
        self.moved_irqs = 0
        self._signals = {}

    def _machinery(self) -> set:
        """PID 1 and its direct children (the session machinery)."""
        keep = {1}
        for pid, tid in _tasks():
            if pid == tid and _parent(pid) == 1 and not _is_kernel_thread(pid):
                keep.add(pid)
        return keep

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGHUP):
            self._signals[number] = signal.signal(number, self._interrupted)
        try:
            self._move_tasks()
            self._move_irqs()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _interrupted(self, number, frame):
        raise SystemExit(f"signal {number}: CPU {self.cpu} given back")

    def _move_tasks(self):
        machinery = self._machinery()
        for pid, tid in _tasks():
            if pid in machinery:
                continue
            try:
                before = os.sched_getaffinity(tid)
                if self.cpu in before and before - {self.cpu}:
                    os.sched_setaffinity(tid, before - {self.cpu})
                    self.tasks[tid] = before
            except OSError:  # gone, or pinned by the kernel
                continue

    def _move_irqs(self):
        for irq in os.listdir("/proc/irq"):
            path = f"/proc/irq/{irq}/smp_affinity"
            if not irq.isdigit() or not os.path.exists(path):
                continue
            with open(path) as f:
                before = f.read().strip()
            try:
                with open(path, "w") as f:
                    f.write(_cpulist_mask(self.others))
                self.irqs[path] = before
                self.moved_irqs += 1
            except OSError:  # not movable (per-CPU, or the controller refuses)
                continue
        for path in ("/proc/irq/default_smp_affinity", WORKQUEUES):
            if os.path.exists(path):
                with open(path) as f:
                    self.irqs[path] = f.read().strip()
                with open(path, "w") as f:
                    f.write(_cpulist_mask(self.others))

    def __exit__(self, *exc):
        for path, mask in self.irqs.items():
            try:
                with open(path, "w") as f:
                    f.write(mask)
            except OSError:
                pass
        narrowed = {}
        for pid, tid in _tasks():
            if tid in self.tasks:
                narrowed[tid] = self.tasks[tid]
                continue
            try:  # forked meanwhile from a task moved: it got the narrowed mask, give it its ancestor's
                if os.sched_getaffinity(tid) != self.others:
                    continue
            except OSError:
                continue
            ancestor = pid
            while ancestor > 1 and ancestor not in self.tasks:
                ancestor = _parent(ancestor)
            if ancestor in self.tasks:
                narrowed[tid] = self.tasks[ancestor]
        for tid, mask in narrowed.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass
        for number, handler in self._signals.items():
            signal.signal(number, handler)
        self.tasks, self.irqs = {}, {}
        return False


def ksoftirqd(cpu: int) -> int:
    """The pid of cpu's ksoftirqd thread."""
    for pid, tid in _tasks():
        if pid == tid:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == f"ksoftirqd/{cpu}":
                        return pid
            except OSError:
                continue
    raise LookupError(f"no ksoftirqd/{cpu}")


def run_ns(pid: int) -> tuple[int, int]:
    """(ns run on a CPU, ns waited runnable for one) of a thread, from /proc/PID/schedstat."""
    with open(f"/proc/{pid}/schedstat") as f:
        ran, waited, _ = f.read().split()
    return int(ran), int(waited)


def cpu_ticks(cpu: int) -> dict:
    """cpu's times from /proc/stat, in seconds (USER_HZ resolution: 10 ms)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                ticks = os.sysconf("SC_CLK_TCK")
                return {n: int(v) / ticks for n, v in zip(names, line.split()[1:])}
    raise LookupError(f"cpu{cpu} not in /proc/stat")
