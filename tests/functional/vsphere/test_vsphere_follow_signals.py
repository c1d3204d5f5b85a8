"""`vtap follow` ends on SIGTERM while vCenter is gone: the simulator is killed with SIGKILL, the
follower's resyncs fail and back off, and SIGTERM then ends it at once with the one line "stopped"
(the backoff was slept out first, and the failure logged after the signal)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from follow_stop import sigterm_while_backing_off, wait_for  # tests/follow_stop.py
from vcsim_simulator import Simulator, available


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

            def kill_simulator():
                os.killpg(sim.process.pid, signal.SIGKILL)
                sim.process.wait()

            code, after = sigterm_while_backing_off(follower, log_path, kill_simulator, "simulator")
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    assert code == 0, after
    assert len(after) == 1 and after[0].endswith("vtap follow: stopped"), after
