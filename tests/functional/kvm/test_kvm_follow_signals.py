"""`vtap follow` ends on SIGTERM while libvirtd is gone: libvirtd (a private one, so the
other tests keep theirs) is killed with SIGKILL, the follower keeps retrying against the
dead socket, and SIGTERM then ends it within seconds with the one line "stopped" (a
retry's backoff was slept out first, and its failure logged after the signal)."""

import os
import signal
import subprocess
import time

import pytest
from follow_stop import sigterm_while_backing_off  # tests/follow_stop.py

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

        def kill_libvirtd():
            os.kill(host.proc.pid, signal.SIGKILL)
            host.proc.wait()
            host.proc = None

        code, after = sigterm_while_backing_off(follower, log_path, kill_libvirtd, "libvirtd")
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        log.close()
        host.stop()
    assert code == 0, after
    assert len(after) == 1 and after[0].endswith("vtap follow: stopped"), after
