"""bench/cpu_isolation.py: the data CPU emptied for a benchmark, and everything put back after.

It touches every task and IRQ of the machine, so what is checked here is that it gives all back:
read from the kernel (sched_getaffinity, /proc/irq) before, during and after, also after an
exception and after SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench")
sys.path.insert(0, os.path.abspath(BENCH))
import cpu_isolation  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: moves other tasks and IRQs between CPUs"),
    pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 CPUs: one to empty, one for the rest"),
]
CPU = os.cpu_count() - 1


def irq_masks() -> dict:
    masks = {}
    for irq in os.listdir("/proc/irq"):
        path = f"/proc/irq/{irq}/smp_affinity"
        if os.path.exists(path):
            with open(path) as f:
                masks[irq] = int(f.read().strip().replace(",", ""), 16)
    return masks


@pytest.fixture
def sleeper():
    """A task of ours allowed on every CPU, as other users' tasks are."""
    process = subprocess.Popen(["sleep", "60"])
    os.sched_setaffinity(process.pid, range(os.cpu_count()))
    yield process.pid
    process.kill()
    process.wait()


def test_tasks_and_irqs_leave_the_cpu_and_come_back(sleeper):
    irqs_before = irq_masks()
    with cpu_isolation.Isolated(CPU) as isolated:
        assert CPU not in os.sched_getaffinity(sleeper)
        assert sleeper in isolated.tasks
        during = irq_masks()
        assert isolated.moved_irqs > 0
        moved = [irq for irq, mask in during.items() if irqs_before[irq] & (1 << CPU) and not mask & (1 << CPU)]
        assert len(moved) == isolated.moved_irqs
        # forked inside the window: inherits the narrowed mask, must get the wide one back
        child = subprocess.Popen(["sleep", "60"])
        assert CPU not in os.sched_getaffinity(child.pid)
    try:
        assert os.sched_getaffinity(sleeper) == set(range(os.cpu_count()))
        assert os.sched_getaffinity(child.pid) == os.sched_getaffinity(os.getpid())
        assert CPU in os.sched_getaffinity(os.getpid())
        assert irq_masks() == irqs_before
    finally:
        child.kill()
        child.wait()


def test_given_back_after_an_exception(sleeper):
    irqs_before = irq_masks()
    with pytest.raises(RuntimeError):
        with cpu_isolation.Isolated(CPU):
            assert CPU not in os.sched_getaffinity(sleeper)
            raise RuntimeError("benchmark failed")
    assert os.sched_getaffinity(sleeper) == set(range(os.cpu_count()))
    assert irq_masks() == irqs_before


def test_given_back_on_sigterm(sleeper, tmp_path):
    """A benchmark killed with SIGTERM (timeout, Ctrl-C's cousin) still hands the CPU back."""
    ready = tmp_path / "ready"
    script = f"import sys, time; sys.path.insert(0, {os.path.abspath(BENCH)!r}); import cpu_isolation\n" \
             f"with cpu_isolation.Isolated({CPU}):\n    open({str(ready)!r}, 'w').close()\n    time.sleep(60)\n"
    irqs_before = irq_masks()
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if ready.exists():
            break
        time.sleep(0.05)
    assert ready.exists(), process.stderr.read() if process.poll() is not None else "not isolated in 5 s"
    assert CPU not in os.sched_getaffinity(sleeper)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert "given back" in stderr
    assert os.sched_getaffinity(sleeper) == set(range(os.cpu_count()))
    assert irq_masks() == irqs_before


def test_the_data_cpus_ksoftirqd_and_run_time():
    pid = cpu_isolation.ksoftirqd(CPU)
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == f"ksoftirqd/{CPU}"
    ran, _ = cpu_isolation.run_ns(os.getpid())
    sum(range(2_000_000))
    assert cpu_isolation.run_ns(os.getpid())[0] > ran
