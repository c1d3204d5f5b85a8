"""`vtap follow` ends on SIGTERM while vCenter is gone: the simulator is killed with SIGKILL, the
follower's resyncs fail and back off, and SIGTERM then ends it at once with the one line "stopped"
(the backoff was slept out first, and the failure logged after the signal)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from vcsim_simulator import Simulator, available


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_follow_ends_on_sigterm_after_vcenter_was_killed(tmp_path):
    why = available()
    if why:
        pytest.skip(why)
    log_path = tmp_path / "follow.log"
    with Simulator(hosts=1, vms=2) as sim, open(log_path, "w") as log:
        env = dict(os.environ, VTAP_VSPHERE_PASSWORD=sim.password)
        follower = subprocess.Popen(
            [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--url", sim.url, "--user", sim.user, "--insecure",
             "--state", str(tmp_path / "s.db"), "follow", "--interval", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            wait_for(lambda: "following driver vsphere" in log_path.read_text(), 30, "the follower to start")
            time.sleep(2)  # resyncs against the live simulator
            os.killpg(sim.process.pid, signal.SIGKILL)
            sim.process.wait()
            wait_for(lambda: "reconcile everything failed" in log_path.read_text(), 30, "a resync to fail against the dead simulator")
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
    after = log_path.read_text()[len(before):].splitlines()
    assert code == 0, after
    assert len(after) == 1 and after[0].endswith("vtap follow: stopped"), after
