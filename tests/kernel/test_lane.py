"""Boot the stock-kernel lane once; fail with the guest's output when its tests fail.

The lane's own tests (tests/kernel/test_*.py other than this one) skip on the
host and run inside the guest, where this test skips instead.
"""

import os
import shutil

import pytest

from . import lane

LANE_TESTS = ["tests/kernel"]


@pytest.mark.skipif(lane.in_lane(), reason="this is the lane: it does not boot itself")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the lane's guest shares the host's root file system over 9p")
@pytest.mark.skipif(lane.kernel_path() is None, reason="no /boot/vmlinuz-*: scripts/setup --test installs linux-image-amd64")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no qemu-system-x86_64: scripts/setup --test installs it")
def test_stock_kernel_lane(tmp_path):
    rc, log, console = lane.boot(tmp_path / "results", LANE_TESTS)
    if rc is None:
        pytest.fail(f"the lane guest did not finish its tests\n--- console ---\n{console[-6000:]}\n--- pytest ---\n{log[-6000:]}")
    print(log)
    assert rc == 0, f"tests inside the stock-kernel lane failed (exit {rc})\n{log[-12000:]}"
    assert " passed" in log and " failed" not in log, log
