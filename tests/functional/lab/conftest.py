"""The lab of the lab-driver tests: two hosts, three namespace VMs (vm1, vm2 on host1; vm3 on host2)."""

import uuid

import pytest

from vtap_drivers.lab.topology import Lab


@pytest.fixture
def lab():
    lab = Lab(f"vtl{uuid.uuid4().hex[:6]}")
    lab.build({"vm1": "host1", "vm2": "host1", "vm3": "host2"})
    yield lab
    lab.destroy()
