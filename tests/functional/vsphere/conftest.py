"""A live vSphere simulator per test module, a direct pyVmomi view of it, and a driver."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vsphere"))
from vcsim_simulator import module_simulator  # noqa: E402

pytest.importorskip("pyVmomi", reason="pyvmomi missing: run scripts/setup --test")
from vcenter import Vcenter  # noqa: E402


@pytest.fixture(scope="module")
def vcsim():
    yield from module_simulator(hosts=3, vms=6)


@pytest.fixture(scope="module")
def si(vcsim):
    return vcsim.connect()


@pytest.fixture
def driver(vcsim, tmp_path):
    from vtap_drivers.vsphere.driver import VsphereDriver

    drv = VsphereDriver(url=vcsim.url, user=vcsim.user, password=vcsim.password, state_dir=str(tmp_path))
    yield drv
    drv.remove(drv.observe())  # leave the module's simulator as it was found
    drv.close()


@pytest.fixture(scope="module")
def vc(si):
    return Vcenter(si)
