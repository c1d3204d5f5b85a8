"""SIGTERM to a `vtap follow` whose platform was killed: the kvm and vsphere tests share the sequence."""

import signal
import time


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def sigterm_while_backing_off(follower, log_path, kill_platform, platform: str):
    """Kill the platform, let two resyncs fail, SIGTERM the follower while the next one backs off.

    Returns the follower's exit code (it must end within 5 s) and the lines it wrote after the signal.
    """
    try:
        kill_platform()
        # Every resync now fails after its retries; the next one starts a second later.
        wait_for(lambda: "reconcile everything failed" in log_path.read_text(), 30, f"a resync to fail against the dead {platform}")
        failures = log_path.read_text().count("reconcile everything failed")
        wait_for(lambda: log_path.read_text().count("reconcile everything failed") > failures, 30, "the next resync to fail too")
        time.sleep(1.5)  # the resync after that is now backing off between its retries
        before = log_path.read_text()
        follower.send_signal(signal.SIGTERM)
        code = follower.wait(5)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    return code, log_path.read_text()[len(before):].splitlines()
