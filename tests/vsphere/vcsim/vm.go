package main

import (
	"fmt"
	"reflect"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// VM is a virtual machine whose distributed-switch NICs are bound to ports and whose
// relocation is reported as vSphere reports it.
type VM struct {
	simulator.VirtualMachine
}

var nextMAC int

func wrapVM(stock *simulator.VirtualMachine) *VM {
	portsMu.Lock()
	defer portsMu.Unlock()
	vm := &VM{VirtualMachine: *stock}
	devices := make([]types.BaseVirtualDevice, len(vm.Config.Hardware.Device))
	var guestNet []types.GuestNicInfo
	for i, device := range vm.Config.Hardware.Device {
		devices[i] = device
		backing := dvsBacking(device)
		if backing == nil {
			continue
		}
		// The stock model hands every VM the same NIC object; give each VM its own.
		device = copyDevice(device)
		backing = &types.VirtualEthernetCardDistributedVirtualPortBackingInfo{Port: backing.Port}
		device.GetVirtualDevice().Backing = backing
		if s := byPortgroup[backing.Port.PortgroupKey]; s != nil {
			backing.Port.SwitchUuid = s.Uuid // (see wrapSwitch: UUIDs made unique)
		}
		// ... which also gives every VM the same MAC; vCenter assigns unique ones (00:50:56 prefix).
		nextMAC++
		device.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard().MacAddress =
			fmt.Sprintf("00:50:56:%02x:%02x:%02x", nextMAC>>16&0xff, nextMAC>>8&0xff, nextMAC&0xff)
		devices[i] = device
		guestNet = append(guestNet, guestNic(device, nextMAC))
		if s := switches[backing.Port.SwitchUuid]; s != nil {
			backing.Port.PortKey = s.allocatePort(backing.Port.PortgroupKey, vm.Self, device.GetVirtualDevice().Key).Key
		}
	}
	vm.Config.Hardware.Device = devices
	if len(guestNet) > 0 {
		// GuestInfo.net, "Guest information about network adapters", and GuestInfo.ipAddress,
		// "Primary IP address assigned to the guest operating system" (what VMware Tools report).
		guest := *vm.Guest
		guest.Net = guestNet
		guest.IpAddress = guestNet[0].IpAddress[0]
		guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		vm.Guest = &guest
	}
	vm.Config.ChangeVersion = changeVersion()
	placeOnFirstHost(vm)
	simulator.Map.Put(vm)
	return vm
}

// placeOnFirstHost moves the VM to its cluster's first host by name. The stock simulator picks
// a random host, and where a VM runs decides whether a mirror delivers: a dvPortMirror session
// works only when its source and destination ports are on one ESXi host (vSphere Networking
// guide, "Port Mirroring Interoperability" and the "Distributed Port Mirroring" session type).
// A port is on its VM's host (FetchDVPorts' proxyHost, see ports.go); tests move VMs with
// RelocateVM_Task, so they know where every VM runs.
func placeOnFirstHost(vm *VM) {
	current, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
	if !ok || current.Parent == nil {
		return
	}
	cluster, ok := simulator.Map.Get(*current.Parent).(*simulator.ClusterComputeResource)
	if !ok || len(cluster.Host) == 0 {
		return
	}
	var first *simulator.HostSystem
	for _, ref := range cluster.Host {
		if h, ok := simulator.Map.Get(ref).(*simulator.HostSystem); ok && (first == nil || h.Name < first.Name) {
			first = h
		}
	}
	if first == nil || first.Self == current.Self {
		return
	}
	simulator.Map.RemoveReference(current, &current.Vm, vm.Self)
	simulator.Map.AddReference(first, &first.Vm, vm.Self)
	host := first.Self
	vm.Runtime.Host = &host
	vm.Summary.Runtime.Host = &host
}

// guestNic: a NIC as VMware Tools report it (GuestNicInfo), with a unique address from 198.18.0.0/15
// (RFC 2544's benchmarking range, never routed).
func guestNic(device types.BaseVirtualDevice, n int) types.GuestNicInfo {
	return types.GuestNicInfo{
		MacAddress:     device.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard().MacAddress,
		Connected:      true,
		DeviceConfigId: device.GetVirtualDevice().Key,
		IpAddress:      []string{fmt.Sprintf("198.%d.%d.%d", 18+n>>16&1, n>>8&0xff, n&0xff)},
	}
}

// changeVersion: VirtualMachineConfigInfo.changeVersion, "a unique identifier for a given version
// of the configuration. Each change to the configuration updates this value" (the stock
// simulator never sets it). vCenter uses a timestamp.
func changeVersion() string {
	return time.Now().UTC().Format("2006-01-02T15:04:05.000000000Z")
}

func (vm *VM) bumpChangeVersion() {
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "config.changeVersion", Val: changeVersion()}})
}

// ReconfigVMTask handles edits of distributed-switch NICs itself (the stock simulator does not
// bind ports): vSphere Web Services API reference, VirtualMachine.ReconfigVM_Task with a
// VirtualDeviceConfigSpec "edit" whose backing is VirtualEthernetCardDistributedVirtualPortBackingInfo.
// Naming only switchUuid + portgroupKey connects the NIC to a free port of that portgroup (a
// new one unless the NIC stays in its portgroup); naming portKey connects it to that port.
// Every other change goes to the stock simulator.
func (vm *VM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	var nics []*types.VirtualDeviceConfigSpec
	for _, change := range req.Spec.DeviceChange {
		spec := change.GetVirtualDeviceConfigSpec()
		if spec.Operation == types.VirtualDeviceConfigSpecOperationEdit && dvsBacking(spec.Device) != nil {
			nics = append(nics, spec)
		}
	}
	if len(nics) == 0 {
		body := vm.VirtualMachine.ReconfigVMTask(ctx, req).(*methods.ReconfigVM_TaskBody)
		if task := simulator.Map.Get(body.Res.Returnval).(*simulator.Task); task.Info.Error == nil {
			vm.bumpChangeVersion()
		}
		return body
	}
	task := simulator.CreateTask(vm, "reconfigVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if len(nics) != len(req.Spec.DeviceChange) {
			// Not modelled: NIC reconnects mixed with other device changes in one call.
			return nil, &types.NotSupported{}
		}
		return nil, vm.reconnect(ctx, req, nics)
	})
	return &methods.ReconfigVM_TaskBody{Res: &types.ReconfigVM_TaskResponse{Returnval: task.Run()}}
}

func (vm *VM) reconnect(ctx *simulator.Context, req *types.ReconfigVM_Task, nics []*types.VirtualDeviceConfigSpec) types.BaseMethodFault {
	portsMu.Lock()
	defer portsMu.Unlock()
	devices := append([]types.BaseVirtualDevice(nil), vm.Config.Hardware.Device...)
	for _, spec := range nics {
		wanted := dvsBacking(spec.Device).Port
		index := -1
		for i, d := range devices {
			if d.GetVirtualDevice().Key == spec.Device.GetVirtualDevice().Key {
				index = i
			}
		}
		s := switches[wanted.SwitchUuid]
		if index < 0 || s == nil || s.portgroupSetting(wanted.PortgroupKey) == nil {
			return &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "spec.deviceChange.device.backing.port"}}
		}
		old := dvsBacking(devices[index])
		keep := old != nil && old.Port.SwitchUuid == wanted.SwitchUuid && old.Port.PortgroupKey == wanted.PortgroupKey && wanted.PortKey == ""
		key := ""
		switch {
		case keep:
			key = old.Port.PortKey
		case wanted.PortKey != "":
			p, fault := s.connectPort(wanted.PortKey, wanted.PortgroupKey, vm.Self, spec.Device.GetVirtualDevice().Key)
			if fault != nil {
				return fault
			}
			key = p.Key
		default:
			key = s.allocatePort(wanted.PortgroupKey, vm.Self, spec.Device.GetVirtualDevice().Key).Key
		}
		if old != nil && !keep && old.Port.PortKey != key {
			if previous := switches[old.Port.SwitchUuid]; previous != nil {
				previous.releasePort(old.Port.PortKey)
			}
		}
		device := copyDevice(devices[index])
		device.GetVirtualDevice().Backing = &types.VirtualEthernetCardDistributedVirtualPortBackingInfo{
			Port: types.DistributedVirtualSwitchPortConnection{SwitchUuid: wanted.SwitchUuid, PortgroupKey: wanted.PortgroupKey, PortKey: key},
		}
		if connectable := spec.Device.GetVirtualDevice().Connectable; connectable != nil {
			device.GetVirtualDevice().Connectable = connectable
		}
		devices[index] = device
	}
	var networks []types.ManagedObjectReference
	for _, d := range devices {
		if b := dvsBacking(d); b != nil {
			// The stock simulator uses the portgroup's moref value as its key.
			networks = append(networks, types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey})
		}
	}
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "config.hardware.device", Val: devices},
		{Name: "network", Val: networks},
		{Name: "config.changeVersion", Val: changeVersion()},
	})
	vm.post(ctx, &types.VmReconfiguredEvent{VmEvent: vm.event(), ConfigSpec: req.Spec})
	return nil
}

// RelocateVMTask moves the VM to spec.host (and spec.pool) and posts VmMigratedEvent
// ("This event records a virtual machine migration", vSphere Web Services API reference).
// The stock simulator neither posts the event nor moves the VM between HostSystem.vm lists.
// A VM keeps its distributed ports when it moves within a switch, so the destination host
// must be a member of every switch the VM's NICs use.
func (vm *VM) RelocateVMTask(ctx *simulator.Context, req *types.RelocateVM_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "relocateVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		source := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
		event := &types.VmMigratedEvent{
			VmEvent:    vm.event(),
			SourceHost: types.HostEventArgument{EntityEventArgument: types.EntityEventArgument{Name: source.Name}, Host: source.Self},
		}
		var changes []types.PropertyChange
		if ref := req.Spec.Host; ref != nil {
			dest, ok := simulator.Map.Get(*ref).(*simulator.HostSystem)
			if !ok {
				return nil, &types.ManagedObjectNotFound{Obj: *ref}
			}
			for _, d := range vm.Config.Hardware.Device {
				if b := dvsBacking(d); b != nil {
					if s := switches[b.Port.SwitchUuid]; s != nil && simulator.FindReference(s.Summary.HostMember, dest.Self) == nil {
						return nil, &types.InvalidArgument{InvalidProperty: "spec.host"}
					}
				}
			}
			simulator.Map.RemoveReference(source, &source.Vm, vm.Self)
			simulator.Map.AddReference(dest, &dest.Vm, vm.Self)
			changes = append(changes,
				types.PropertyChange{Name: "runtime.host", Val: dest.Self},
				types.PropertyChange{Name: "summary.runtime.host", Val: dest.Self})
			event.Host = &types.HostEventArgument{EntityEventArgument: types.EntityEventArgument{Name: dest.Name}, Host: dest.Self}
		}
		if ref := req.Spec.Pool; ref != nil {
			changes = append(changes, types.PropertyChange{Name: "resourcePool", Val: *ref})
		}
		simulator.Map.Update(vm, changes)
		vm.post(ctx, event)
		return nil, nil
	})
	return &methods.RelocateVM_TaskBody{Res: &types.RelocateVM_TaskResponse{Returnval: task.Run()}}
}

// DestroyTask frees the VM's distributed ports before the stock simulator removes it (vCenter
// releases a deleted VM's ports; the stock simulator keeps no port table to release).
func (vm *VM) DestroyTask(ctx *simulator.Context, req *types.Destroy_Task) soap.HasFault {
	portsMu.Lock()
	for _, d := range vm.Config.Hardware.Device {
		if b := dvsBacking(d); b != nil && switches[b.Port.SwitchUuid] != nil {
			switches[b.Port.SwitchUuid].releasePort(b.Port.PortKey)
		}
	}
	portsMu.Unlock()
	return vm.VirtualMachine.DestroyTask(ctx, req)
}

func (vm *VM) event() types.VmEvent {
	host := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
	dc := datacenterOf(vm)
	return types.VmEvent{Event: types.Event{
		Vm:         &types.VmEventArgument{EntityEventArgument: types.EntityEventArgument{Name: vm.Name}, Vm: vm.Self},
		Host:       &types.HostEventArgument{EntityEventArgument: types.EntityEventArgument{Name: host.Name}, Host: host.Self},
		Datacenter: &types.DatacenterEventArgument{EntityEventArgument: types.EntityEventArgument{Name: dc.Entity().Name}, Datacenter: dc.Reference()},
	}}
}

func datacenterOf(entity mo.Entity) mo.Entity {
	for entity != nil {
		if dc, ok := entity.(*simulator.Datacenter); ok {
			return dc
		}
		parent := entity.Entity().Parent
		if parent == nil {
			break
		}
		entity, _ = simulator.Map.Get(*parent).(mo.Entity)
	}
	return simulator.Map.Any("Datacenter")
}

func (vm *VM) post(ctx *simulator.Context, event types.BaseEvent) {
	manager := simulator.Map.EventManager()
	ctx.WithLock(manager, func() {
		manager.PostEvent(ctx, &types.PostEvent{EventToPost: event})
	})
}

func dvsBacking(device types.BaseVirtualDevice) *types.VirtualEthernetCardDistributedVirtualPortBackingInfo {
	if _, nic := device.(types.BaseVirtualEthernetCard); !nic {
		return nil
	}
	backing, _ := device.GetVirtualDevice().Backing.(*types.VirtualEthernetCardDistributedVirtualPortBackingInfo)
	return backing
}

// copyDevice makes a shallow copy of a device of any concrete type (VirtualE1000, VirtualVmxnet3...).
func copyDevice(device types.BaseVirtualDevice) types.BaseVirtualDevice {
	value := reflect.New(reflect.TypeOf(device).Elem())
	value.Elem().Set(reflect.ValueOf(device).Elem())
	return value.Interface().(types.BaseVirtualDevice)
}

// SetCustomValue does what vCenter's ExtensibleManagedObject.setCustomValue does (vSphere Web
// Services API reference, ExtensibleManagedObject.setCustomValue: "Assigns a value to a custom
// field"): one value per field, a new value replaces the old one, and the change of customValue
// and value reaches PropertyCollector clients like any property change. The stock simulator
// appends a second value and tells no collector, so a follower would never see a retag.
func (vm *VM) SetCustomValue(ctx *simulator.Context, req *types.SetCustomValue) soap.HasFault {
	body := &methods.SetCustomValueBody{}
	key, found := int32(0), false
	for _, field := range simulator.Map.CustomFieldsManager().Field {
		if field.Name == req.Key && (field.ManagedObjectType == "" || field.ManagedObjectType == "VirtualMachine") {
			key, found = field.Key, true
		}
	}
	if !found {
		body.Fault_ = simulator.Fault("", &types.InvalidArgument{InvalidProperty: "key"})
		return body
	}
	var values []types.BaseCustomFieldValue
	for _, value := range vm.CustomValue {
		if value.GetCustomFieldValue().Key != key {
			values = append(values, value)
		}
	}
	values = append(values, &types.CustomFieldStringValue{CustomFieldValue: types.CustomFieldValue{Key: key}, Value: req.Value})
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "customValue", Val: values}, {Name: "value", Val: values}})
	body.Res = &types.SetCustomValueResponse{}
	return body
}

// RenameTask renames the VM the way vCenter does (ManagedEntity.Rename_Task): the VM's name is
// also its configuration's name (VirtualMachineConfigInfo.name), so config.changeVersion moves
// with it ("each change to the configuration updates this value"). The stock simulator changes
// only the entity's name.
func (vm *VM) RenameTask(req *types.Rename_Task) soap.HasFault {
	body := vm.VirtualMachine.RenameTask(req).(*methods.Rename_TaskBody)
	if task := simulator.Map.Get(body.Res.Returnval).(*simulator.Task); task.Info.Error == nil {
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "config.name", Val: req.NewName}, {Name: "config.changeVersion", Val: changeVersion()}})
	}
	return body
}
