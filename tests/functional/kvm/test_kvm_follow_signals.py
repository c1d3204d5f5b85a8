"""`vtap follow` ends on SIGTERM while libvirtd is gone: libvirtd (a private one, so the
other tests keep theirs) is killed with SIGKILL, the follower keeps retrying against the
dead socket, and SIGTERM then ends it within seconds with the one line "stopped" (a
retry's backoff was slept out first, and its failure logged after the signal)."""

import os
import signal
import subprocess
import time

import pytest

from . import kvm_lab as lab
from .kvm_lab import wait_for

pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")


def test_follow_ends_on_sigterm_after_libvirtd_was_killed(kvm_workdir, tmp_path):
    host = lab.LibvirtHost(tmp_path, "gone").start()
    log_path = tmp_path / "follow.log"
    log = open(log_path, "w")
    follower = subprocess.Popen(
        ["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(tmp_path / "s.db"), "follow", "--interval", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "following driver kvm" in log_path.read_text(), 20, "the follower to start")
        time.sleep(1.5)  # a resync or two against the live libvirtd
        os.kill(host.proc.pid, signal.SIGKILL)
        host.proc.wait()
        host.proc = None
        # Every resync now fails after its retries; the next one starts a second later.
        wait_for(lambda: "reconcile everything failed" in log_path.read_text(), 30, "a resync to fail against the dead libvirtd")
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
        log.close()
        host.stop()
    after = log_path.read_text()[len(before):].splitlines()
    assert code == 0, after
    assert len(after) == 1 and after[0].endswith("vtap follow: stopped"), after
