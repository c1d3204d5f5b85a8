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


@pytest.fixture
def nodes():
    """make(node_name) -> a NodeNamespace named uniquely; all removed afterwards."""
    import os
    import uuid

    from pve_lab import NodeNamespace

    if os.geteuid() != 0:
        pytest.skip("needs root: plays PVE nodes as network namespaces")
    made = []
    tag = uuid.uuid4().hex[:6]

    def make(node):
        ns = NodeNamespace(f"vtpve-{tag}-{node}")
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.remove()
