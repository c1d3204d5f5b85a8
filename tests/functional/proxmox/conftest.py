"""Fixtures of the proxmox tests: a fake PVE cluster per test."""

import pytest

pytest.importorskip("fakepve", reason="fakepve is a test dependency: scripts/setup --test installs it")


@pytest.fixture
def cluster(tmp_path):
    from pve_lab import FakeCluster

    fake = FakeCluster(tmp_path)
    try:
        yield fake
    finally:
        fake.stop()
