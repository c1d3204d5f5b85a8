"""What a test reads and does in the simulator through pyVmomi directly (never through vtap)."""

import time

from pyVmomi import vim

VSPAN = vim.dvs.VmwareDistributedVirtualSwitch


class Vcenter:
    """What a test reads and does through pyVmomi directly."""

    def __init__(self, si):
        self.si = si
        self.content = si.RetrieveContent()

    def all(self, kind):
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
        try:
            return list(view.view)
        finally:
            view.DestroyView()

    @property
    def switch(self):
        return self.all(vim.DistributedVirtualSwitch)[0]

    def vms(self):
        return sorted(self.all(vim.VirtualMachine), key=lambda vm: vm.name)

    def vm(self, index):
        return self.vms()[index]

    def hosts(self):
        return sorted(self.all(vim.HostSystem), key=lambda h: h.name)

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
        self.vspan((operation, session))

    def vspan(self, *operations, version=None):
        """One ReconfigureDvs_Task with these (operation, VspanSession) pairs, as an administrator would."""
        spec = VSPAN.ConfigSpec(
            configVersion=version or self.version(),
            vspanConfigSpec=[VSPAN.VspanConfigSpec(operation=op, vspanSession=session) for op, session in operations],
        )
        return self.wait(self.switch.ReconfigureDvs_Task(spec))

    def move_nic(self, vm, portgroup):
        """Reconnect a VM's NIC to another portgroup: vCenter gives it a new port."""
        nic = self.nic(vm)
        nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(switchUuid=self.switch.uuid, portgroupKey=portgroup.key)
        )
        change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)
        self.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change])))

    def create_vm(self, name, portgroup=None):
        """Folder.CreateVM_Task with one vmxnet3 NIC on a portgroup of the switch (default: its first
        VM portgroup), as a vSphere client creates a VM."""
        key = portgroup or next(pg.key for pg in self.switch.portgroup if "DVUplinks" not in pg.name)
        backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(switchUuid=self.switch.uuid, portgroupKey=key)
        )
        nic = vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualVmxnet3(key=-1, backing=backing))
        spec = vim.vm.ConfigSpec(name=name, files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"), deviceChange=[nic])
        datacenter = self.all(vim.Datacenter)[0]
        return self.wait(datacenter.vmFolder.CreateVM_Task(spec, pool=self.vm(0).resourcePool))

    def clone_vm(self, source, name):
        """VirtualMachine.CloneVM_Task into the datacenter's VM folder."""
        datacenter = self.all(vim.Datacenter)[0]
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec())
        return self.wait(source.CloneVM_Task(folder=datacenter.vmFolder, name=name, spec=spec))

    def set_promiscuous(self, port_key, allow):
        setting = VSPAN.VmwarePortConfigPolicy(
            securityPolicy=VSPAN.SecurityPolicy(allowPromiscuous=vim.BoolPolicy(value=allow))
        )
        spec = vim.dvs.DistributedVirtualPort.ConfigSpec(operation="edit", key=port_key, setting=setting)
        self.wait(self.switch.ReconfigureDVPort_Task([spec]))
