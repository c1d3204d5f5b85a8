"""A live vSphere simulator per test module, a direct pyVmomi view of it, and a driver."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vsphere"))
from vcsim_simulator import Simulator, available  # noqa: E402

pyVmomi = pytest.importorskip("pyVmomi", reason="pyvmomi missing: run scripts/setup --test")
from pyVmomi import vim  # noqa: E402


@pytest.fixture(scope="module")
def vcsim():
    why = available()
    if why:
        pytest.skip(why)
    with Simulator(hosts=3, vms=6) as sim:
        yield sim


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


class Vcenter:
    """What a test reads and does through pyVmomi directly."""

    def __init__(self, si):
        self.si = si
        self.content = si.RetrieveContent()

    def _all(self, kind):
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
        try:
            return list(view.view)
        finally:
            view.DestroyView()

    @property
    def switch(self):
        return self._all(vim.DistributedVirtualSwitch)[0]

    def vms(self):
        return sorted(self._all(vim.VirtualMachine), key=lambda vm: vm.name)

    def vm(self, index):
        return self.vms()[index]

    def hosts(self):
        return sorted(self._all(vim.HostSystem), key=lambda h: h.name)

    def sessions(self):
        return {s.name: s for s in self.switch.config.vspanSession or ()}

    def version(self):
        return self.switch.config.configVersion

    def nic(self, vm):
        return next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))

    def port_key(self, vm):
        return self.nic(vm).backing.port.portKey

    def portgroup(self, name):
        return next(pg for pg in self.switch.portgroup if pg.name == name)

    def wait(self, task):
        while task.info.state not in ("success", "error"):
            time.sleep(0.02)
        if task.info.state == "error":
            raise task.info.error
        return task.info.result

    def reconfigure_vspan(self, operation, session):
        spec = vim.dvs.VmwareDistributedVirtualSwitch.ConfigSpec(
            configVersion=self.version(),
            vspanConfigSpec=[vim.dvs.VmwareDistributedVirtualSwitch.VspanConfigSpec(operation=operation, vspanSession=session)],
        )
        self.wait(self.switch.ReconfigureDvs_Task(spec))

    def move_nic(self, vm, portgroup):
        """Reconnect a VM's NIC to another portgroup: vCenter gives it a new port."""
        nic = self.nic(vm)
        nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(switchUuid=self.switch.uuid, portgroupKey=portgroup.key)
        )
        change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)
        self.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change])))

    def set_promiscuous(self, port_key, allow):
        setting = vim.dvs.VmwareDistributedVirtualSwitch.VmwarePortConfigPolicy(
            securityPolicy=vim.dvs.VmwareDistributedVirtualSwitch.SecurityPolicy(allowPromiscuous=vim.BoolPolicy(value=allow))
        )
        spec = vim.dvs.DistributedVirtualPort.ConfigSpec(operation="edit", key=port_key, setting=setting)
        self.wait(self.switch.ReconfigureDVPort_Task([spec]))


@pytest.fixture(scope="module")
def vc(si):
    return Vcenter(si)
