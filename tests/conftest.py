"""Fixtures shared by every test: root detection and a fresh network namespace per test."""

import os
import shutil
import uuid

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: creates network namespaces and tc filters")


@pytest.fixture
def netns():
    """A fresh, empty network namespace (name returned); deleted afterwards with all it holds."""
    if not IS_ROOT:
        pytest.skip("needs root: creates a network namespace")
    from pyroute2 import netns as pr_netns

    name = f"vtapt-{uuid.uuid4().hex[:8]}"
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)
        # bpffs outlives the namespace: what a test that failed half-way left pinned for it (pcap sinks' rings, mirrors)
        shutil.rmtree(f"/sys/fs/bpf/vtap/ns-{name}", ignore_errors=True)


@pytest.fixture
def state_path(tmp_path):
    """A store path of its own for each test."""
    return str(tmp_path / "vtap.db")



def pytest_configure(config):
    config.addinivalue_line("markers", "tc_only(reason): checks tc-specific kernel structures; not run on datapath=tcx")


@pytest.fixture
def datapath():
    """tc unless the test is parametrized with datapaths.on_both_datapaths."""
    return "tc"
