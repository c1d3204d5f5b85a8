package main

// VMs created or cloned while the simulator runs. vSphere: Folder.CreateVM_Task and
// VirtualMachine.CloneVM_Task connect each distributed-switch NIC of the new VM to a port of its
// portgroup (VirtualEthernetCardDistributedVirtualPortBackingInfo, "the port on the distributed
// switch" the NIC is bound to; a clone gets new ports, never its source's). The stock simulator
// refuses such a NIC because it looks the switch up as its own switch type, which ours replaced
// (switch.go, retype); and it would not bind a port. Here a VM folder hands the stock code the
// NIC as a plain network NIC on the portgroup of that name, then puts the distributed backing back
// and binds the ports the way start-up VMs get theirs (vm.go, wrapVM).

import (
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// VMFolder is a folder of VMs whose CreateVM_Task binds distributed ports.
type VMFolder struct {
	simulator.Folder
}

func wrapVMFolders() {
	for _, obj := range simulator.Map.All("Folder") {
		if f, ok := obj.(*simulator.Folder); ok && holds(&f.Folder, "VirtualMachine") {
			simulator.Map.Put(&VMFolder{Folder: *f})
		}
	}
}

func holds(f *mo.Folder, kind string) bool {
	for _, t := range f.ChildType {
		if t == kind {
			return true
		}
	}
	return false
}

// CreateVMTask: Folder.CreateVM_Task. A distributed-switch NIC must name a switch and one of its
// portgroups (InvalidDeviceSpec otherwise, as vCenter answers a backing it cannot connect).
func (f *VMFolder) CreateVMTask(ctx *simulator.Context, req *types.CreateVM_Task) soap.HasFault {
	backings := map[types.BaseVirtualDevice]*types.VirtualEthernetCardDistributedVirtualPortBackingInfo{}
	spec := *req
	spec.Config.DeviceChange = nil
	for i, change := range req.Config.DeviceChange {
		change := *change.GetVirtualDeviceConfigSpec()
		if backing := dvsBacking(change.Device); backing != nil && change.Operation == types.VirtualDeviceConfigSpecOperationAdd {
			s := switches[backing.Port.SwitchUuid]
			name := ""
			if s != nil && byPortgroup[backing.Port.PortgroupKey] == s {
				name = s.portgroupName(backing.Port.PortgroupKey)
			}
			if name == "" {
				fault := &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "spec.deviceChange.device.backing.port"}, DeviceIndex: int32(i)}
				task := simulator.CreateTask(f, "createVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) { return nil, fault })
				return &methods.CreateVM_TaskBody{Res: &types.CreateVM_TaskResponse{Returnval: task.Run()}}
			}
			// A copy: a clone's spec carries its source VM's own device objects.
			device := copyDevice(change.Device)
			device.GetVirtualDevice().Backing = &types.VirtualEthernetCardNetworkBackingInfo{
				VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: name},
			}
			change.Device = device
			backings[device] = &types.VirtualEthernetCardDistributedVirtualPortBackingInfo{
				Port: types.DistributedVirtualSwitchPortConnection{SwitchUuid: s.Uuid, PortgroupKey: backing.Port.PortgroupKey},
			}
		}
		spec.Config.DeviceChange = append(spec.Config.DeviceChange, &change)
	}
	body := f.Folder.CreateVMTask(ctx, &spec).(*methods.CreateVM_TaskBody)
	task := simulator.Map.Get(body.Res.Returnval).(*simulator.Task)
	if task.Info.Error != nil {
		return body
	}
	vm := simulator.Map.Get(task.Info.Result.(types.ManagedObjectReference)).(*simulator.VirtualMachine)
	for _, device := range vm.Config.Hardware.Device {
		if backing, ok := backings[device]; ok {
			device.GetVirtualDevice().Backing = backing
		}
	}
	// CloneVM_Task calls this too, and wraps the clone itself once the stock clone is done with it.
	if ctx.Caller == nil || *ctx.Caller == f.Self {
		announce(wrapVM(vm))
	}
	return body
}

// CloneVMTask: VirtualMachine.CloneVM_Task; the clone's NICs get ports of their own.
func (vm *VM) CloneVMTask(ctx *simulator.Context, req *types.CloneVM_Task) soap.HasFault {
	body := vm.VirtualMachine.CloneVMTask(ctx, req).(*methods.CloneVM_TaskBody)
	task := simulator.Map.Get(body.Res.Returnval).(*simulator.Task)
	if task.Info.Error == nil {
		if clone, ok := simulator.Map.Get(task.Info.Result.(types.ManagedObjectReference)).(*simulator.VirtualMachine); ok {
			announce(wrapVM(clone))
		}
	}
	return body
}

// announce tells PropertyCollector clients what wrapVM changed after the stock code had reported
// the new VM (its ports, MACs, guest NICs and host), as vCenter reports one finished VM.
func announce(vm *VM) {
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
		{Name: "guest", Val: *vm.Guest},
		{Name: "runtime.host", Val: *vm.Runtime.Host},
		{Name: "summary.runtime.host", Val: *vm.Runtime.Host},
		{Name: "config.changeVersion", Val: changeVersion()},
	})
}

// CreateFolder: a new subfolder of a VM folder is a VM folder too.
func (f *VMFolder) CreateFolder(ctx *simulator.Context, req *types.CreateFolder) soap.HasFault {
	body := f.Folder.CreateFolder(ctx, req).(*methods.CreateFolderBody)
	if body.Res != nil {
		if stock, ok := simulator.Map.Get(body.Res.Returnval).(*simulator.Folder); ok {
			simulator.Map.Put(&VMFolder{Folder: *stock})
		}
	}
	return body
}

// MoveIntoFolderTask: Folder.MoveIntoFolder_Task for VMs and folders (the stock one only knows
// its own folder type as a parent).
func (f *VMFolder) MoveIntoFolderTask(ctx *simulator.Context, req *types.MoveIntoFolder_Task) soap.HasFault {
	task := simulator.CreateTask(f, "moveIntoFolder", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		for _, ref := range req.List {
			obj, ok := simulator.Map.Get(ref).(mo.Entity)
			if !ok || !holds(&f.Folder.Folder, ref.Type) || obj.Entity().Parent == nil {
				return nil, &types.NotSupported{}
			}
			if *obj.Entity().Parent == f.Self {
				continue
			}
			parent, ok := simulator.Map.Get(*obj.Entity().Parent).(*VMFolder)
			if !ok {
				return nil, &types.NotSupported{}
			}
			ctx.WithLock(parent, func() {
				children := append([]types.ManagedObjectReference(nil), parent.ChildEntity...)
				simulator.RemoveReference(&children, ref)
				simulator.Map.Update(parent, []types.PropertyChange{{Name: "childEntity", Val: children}})
			})
			children := append(append([]types.ManagedObjectReference(nil), f.ChildEntity...), ref)
			simulator.Map.Update(f, []types.PropertyChange{{Name: "childEntity", Val: children}})
			simulator.Map.Update(obj, []types.PropertyChange{{Name: "parent", Val: f.Self}})
		}
		return nil, nil
	})
	return &methods.MoveIntoFolder_TaskBody{Res: &types.MoveIntoFolder_TaskResponse{Returnval: task.Run()}}
}
