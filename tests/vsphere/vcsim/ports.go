package main

// Distributed ports. The stock simulator gives NICs no port key and returns every portgroup
// from FetchDVPorts whatever the criteria. vSphere binds each connected NIC to one port of its
// portgroup (VirtualEthernetCardDistributedVirtualPortBackingInfo.port.portKey, "DistributedVirtualSwitchPortConnection"
// in the vSphere Web Services API reference) and FetchDVPorts returns only the ports matching
// DistributedVirtualSwitchPortCriteria (connected, active, uplinkPort, portgroupKey + inside,
// portKey, host).

import (
	"sort"
	"strconv"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// portsMu guards every switch's port table: VM tasks and switch tasks both change it.
var portsMu sync.Mutex

type port struct {
	types.DistributedVirtualPort
	vm     *types.ManagedObjectReference // connectee VM, nil when free or an uplink
	uplink bool
}

// allocatePort binds a new port of portgroup pg to a VM's NIC (vCenter picks a free port key
// when a NIC's backing names only the portgroup). Caller holds portsMu.
func (s *VspanSwitch) allocatePort(pg string, vm types.ManagedObjectReference, nicKey int32) *port {
	s.nextPort++
	p := &port{vm: &vm}
	p.Key = strconv.Itoa(s.nextPort)
	p.DvsUuid = s.Uuid
	p.PortgroupKey = pg
	p.Connectee = &types.DistributedVirtualSwitchPortConnectee{
		ConnectedEntity: &vm,
		NicKey:          strconv.Itoa(int(nicKey)),
		Type:            string(types.DistributedVirtualSwitchPortConnecteeConnecteeTypeVmVnic),
	}
	s.ports[p.Key] = p
	s.publishPortKeys(pg)
	return p
}

// connectPort binds an existing free port (the backing named its port key). Caller holds portsMu.
func (s *VspanSwitch) connectPort(key, pg string, vm types.ManagedObjectReference, nicKey int32) (*port, types.BaseMethodFault) {
	p := s.ports[key]
	if p == nil || p.uplink || p.PortgroupKey != pg {
		return nil, &types.InvalidArgument{InvalidProperty: "spec.deviceChange.device.backing.port.portKey"}
	}
	if p.vm != nil && *p.vm != vm {
		return nil, &types.ResourceInUse{Type: "DistributedVirtualPort", Name: key}
	}
	p.vm = &vm
	p.Connectee = &types.DistributedVirtualSwitchPortConnectee{
		ConnectedEntity: &vm,
		NicKey:          strconv.Itoa(int(nicKey)),
		Type:            string(types.DistributedVirtualSwitchPortConnecteeConnecteeTypeVmVnic),
	}
	return p, nil
}

// releasePort frees the port a NIC leaves; the port itself stays in the portgroup.
func (s *VspanSwitch) releasePort(key string) {
	if p := s.ports[key]; p != nil && !p.uplink {
		p.vm = nil
		p.Connectee = nil
	}
}

// publishPortKeys keeps DistributedVirtualPortgroup.portKeys in step with the port table.
func (s *VspanSwitch) publishPortKeys(pg string) {
	var keys []string
	for _, p := range s.sortedPorts() {
		if p.PortgroupKey == pg {
			keys = append(keys, p.Key)
		}
	}
	for _, ref := range s.Portgroup {
		if obj, ok := simulator.Map.Get(ref).(*simulator.DistributedVirtualPortgroup); ok && obj.Key == pg {
			obj.PortKeys = keys
		}
	}
}

func (s *VspanSwitch) sortedPorts() []*port {
	ports := make([]*port, 0, len(s.ports))
	for _, p := range s.ports {
		ports = append(ports, p)
	}
	sort.Slice(ports, func(i, j int) bool {
		a, _ := strconv.Atoi(ports[i].Key)
		b, _ := strconv.Atoi(ports[j].Key)
		return a < b
	})
	return ports
}

// view is the port as FetchDVPorts reports it: settings fall back to the portgroup's
// defaultPortConfig, and a VM's port is proxied by the host the VM runs on now.
func (s *VspanSwitch) view(p *port) types.DistributedVirtualPort {
	out := p.DistributedVirtualPort
	if out.Config.Setting == nil {
		out.Config.Setting = s.portgroupSetting(p.PortgroupKey)
	}
	if p.vm != nil {
		if vm, ok := simulator.Map.Get(*p.vm).(*VM); ok && vm.Runtime.Host != nil {
			host := *vm.Runtime.Host
			out.ProxyHost = &host
		}
	}
	return out
}

func (s *VspanSwitch) portgroupSetting(pg string) types.BaseDVPortSetting {
	for _, ref := range s.Portgroup {
		if obj, ok := simulator.Map.Get(ref).(*simulator.DistributedVirtualPortgroup); ok && obj.Key == pg {
			return obj.Config.DefaultPortConfig
		}
	}
	return nil
}

// portgroupName is the name of one of the switch's portgroups, "" when it has none by that key.
func (s *VspanSwitch) portgroupName(pg string) string {
	for _, ref := range s.Portgroup {
		if obj, ok := simulator.Map.Get(ref).(*simulator.DistributedVirtualPortgroup); ok && obj.Key == pg {
			return obj.Name
		}
	}
	return ""
}

// promiscuous tells whether a port's effective security policy allows promiscuous mode.
func (s *VspanSwitch) promiscuous(key string) bool {
	p := s.ports[key]
	if p == nil {
		return false
	}
	setting, ok := s.view(p).Config.Setting.(*types.VMwareDVSPortSetting)
	if !ok || setting.SecurityPolicy == nil || setting.SecurityPolicy.AllowPromiscuous == nil {
		return false
	}
	return setting.SecurityPolicy.AllowPromiscuous.Value != nil && *setting.SecurityPolicy.AllowPromiscuous.Value
}

// matches applies DistributedVirtualSwitchPortCriteria (vSphere Web Services API reference,
// data object DistributedVirtualSwitchPortCriteria). scope is not modelled.
func (s *VspanSwitch) matches(p *port, c *types.DistributedVirtualSwitchPortCriteria) bool {
	if c == nil {
		return true
	}
	connected := p.vm != nil || p.uplink
	if c.Connected != nil && *c.Connected != connected {
		return false
	}
	if c.Active != nil && *c.Active != connected {
		return false
	}
	if c.UplinkPort != nil && *c.UplinkPort != p.uplink {
		return false
	}
	if c.NsxPort != nil && *c.NsxPort {
		return false
	}
	if len(c.PortgroupKey) > 0 {
		inside := c.Inside == nil || *c.Inside
		if contains(c.PortgroupKey, p.PortgroupKey) != inside {
			return false
		}
	}
	if len(c.PortKey) > 0 && !contains(c.PortKey, p.Key) {
		return false
	}
	if len(c.Host) > 0 {
		view := s.view(p)
		if view.ProxyHost == nil {
			return false
		}
		found := false
		for _, h := range c.Host {
			found = found || h == *view.ProxyHost
		}
		if !found {
			return false
		}
	}
	return true
}

func contains(list []string, value string) bool {
	for _, item := range list {
		if item == value {
			return true
		}
	}
	return false
}
