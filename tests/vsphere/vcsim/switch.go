package main

import (
	"strconv"
	"strings"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// VspanSwitch is a distributed switch that keeps port mirroring sessions and a port table.
type VspanSwitch struct {
	simulator.DistributedVirtualSwitch

	ports       map[string]*port
	nextPort    int
	nextSession int
	denyVspan   bool // the logged-in user's role lacks DVSwitch.Vspan (--deny-vspan)
}

// switches finds a switch by UUID (NIC backings name their switch by UUID), byPortgroup by
// the key of one of its portgroups.
var (
	switches    = map[string]*VspanSwitch{}
	byPortgroup = map[string]*VspanSwitch{}
)

func wrapSwitch(stock *simulator.DistributedVirtualSwitch, erspan, denyVspan bool) {
	s := &VspanSwitch{DistributedVirtualSwitch: *stock, ports: map[string]*port{}, denyVspan: denyVspan}
	config := s.Config.(*types.VMwareDVSConfigInfo)
	// The stock simulator derives a switch's UUID from its name, and names every
	// datacenter's switch DVS0; vCenter's switch UUIDs are unique.
	if _, taken := switches[s.Uuid]; taken {
		s.Uuid = uuid.NewSHA1(uuid.NameSpaceURL, []byte("vtap-vcsim:"+s.Self.Value)).String()
		s.Summary.Uuid = s.Uuid
		config.Uuid = s.Uuid
	}
	// DVSConfigInfo.configVersion: "The version string of the configuration"; the stock
	// simulator leaves it empty, vSphere always sets one.
	config.ConfigVersion = "1"

	// DVSCapability.featuresSupported / VMwareDVSFeatureCapability.vspanCapability
	// (VMwareDVSVspanCapability): what a vSphere 7/8 switch reports.
	s.Capability.FeaturesSupported = &types.VMwareDVSFeatureCapability{
		VspanSupported: types.NewBool(true),
		VspanCapability: &types.VMwareDVSVspanCapability{
			MixedDestSupported:         true,
			DvportSupported:            true,
			RemoteSourceSupported:      true,
			RemoteDestSupported:        true,
			EncapRemoteSourceSupported: true,
			ErspanProtocolSupported:    types.NewBool(erspan),
		},
	}

	// The stock switch has an uplink portgroup without ports and no uplinkPortgroup or
	// uplinkPortPolicy. vSphere: one uplink port per member host per uplink name
	// (DVSNameArrayUplinkPortPolicy.uplinkPortName), in the switch's uplink portgroup.
	config.UplinkPortPolicy = &types.DVSNameArrayUplinkPortPolicy{UplinkPortName: []string{"dvUplink1"}}
	for _, ref := range s.Portgroup {
		pg := simulator.Map.Get(ref).(*simulator.DistributedVirtualPortgroup)
		byPortgroup[pg.Key] = s
		// DVPortgroupConfigInfo.type is always set by vCenter (earlyBinding: "static binding",
		// the default for a new portgroup); the stock simulator leaves it empty.
		if pg.Config.Type == "" {
			pg.Config.Type = string(types.DistributedVirtualPortgroupPortgroupTypeEarlyBinding)
		}
		if strings.Contains(pg.Name, "-DVUplinks") {
			config.UplinkPortgroup = []types.ManagedObjectReference{ref}
			for _, host := range s.Summary.HostMember {
				s.nextPort++
				p := &port{uplink: true}
				p.Key = strconv.Itoa(s.nextPort)
				p.DvsUuid = s.Uuid
				p.PortgroupKey = pg.Key
				h := host
				p.ProxyHost = &h
				p.Config.Name = "dvUplink1"
				p.Connectee = &types.DistributedVirtualSwitchPortConnectee{
					ConnectedEntity: &h,
					NicKey:          "vmnic0",
					Type:            string(types.DistributedVirtualSwitchPortConnecteeConnecteeTypePnic),
				}
				s.ports[p.Key] = p
			}
			s.publishPortKeys(pg.Key)
		}
	}
	switches[s.Uuid] = s
	retype(stock.Self, s)
}

// retype registers the switch as what vCenter's distributed switches are: VmwareDistributedVirtualSwitch
// objects (the stock simulator files them as DistributedVirtualSwitch). vCenter checks a property
// path against the PropertySpec's type, and config.vspanSession exists only on VMwareDVSConfigInfo,
// so a client must ask for it on VmwareDistributedVirtualSwitch; here it has to work the same way.
func retype(old types.ManagedObjectReference, s *VspanSwitch) {
	s.Self.Type = "VmwareDistributedVirtualSwitch"
	simulator.Map.Remove(old)
	simulator.Map.Put(s)
	folder := simulator.Map.Get(*s.Parent).(*simulator.Folder)
	for i, ref := range folder.ChildEntity {
		if ref == old {
			folder.ChildEntity[i] = s.Self
		}
	}
	for _, ref := range s.Portgroup {
		self := s.Self
		simulator.Map.Get(ref).(*simulator.DistributedVirtualPortgroup).Config.DistributedVirtualSwitch = &self
	}
}

// FetchDVPorts honours its criteria (see ports.go).
func (s *VspanSwitch) FetchDVPorts(req *types.FetchDVPorts) soap.HasFault {
	portsMu.Lock()
	defer portsMu.Unlock()
	var res []types.DistributedVirtualPort
	for _, p := range s.sortedPorts() {
		if s.matches(p, req.Criteria) {
			res = append(res, s.view(p))
		}
	}
	return &methods.FetchDVPortsBody{Res: &types.FetchDVPortsResponse{Returnval: res}}
}

// ReconfigureDVPortTask changes per-port settings (vSphere Web Services API reference:
// DistributedVirtualSwitch.ReconfigureDVPort_Task with DVPortConfigSpec operation "edit").
// Tests use it to put a port in promiscuous mode the way an administrator would.
func (s *VspanSwitch) ReconfigureDVPortTask(ctx *simulator.Context, req *types.ReconfigureDVPort_Task) soap.HasFault {
	task := simulator.CreateTask(s, "reconfigureDVPort", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		portsMu.Lock()
		defer portsMu.Unlock()
		for _, spec := range req.Port {
			p := s.ports[spec.Key]
			if p == nil || spec.Operation != string(types.ConfigSpecOperationEdit) {
				return nil, &types.InvalidArgument{InvalidProperty: "port.key"}
			}
			if spec.Setting != nil {
				previous := p.Config.Setting
				p.Config.Setting = spec.Setting
				// VspanPortPromiscChangeFault: "Thrown when changing a port to promiscuous mode
				// if the port is used as transmitted source or destination" of a mirror session.
				if s.promiscuous(p.Key) && s.inSession(p.Key) {
					p.Config.Setting = previous
					return nil, &types.VspanPortPromiscChangeFault{PortKey: p.Key}
				}
			}
			if spec.Name != "" {
				p.Config.Name = spec.Name
			}
		}
		return nil, nil
	})
	return &methods.ReconfigureDVPort_TaskBody{Res: &types.ReconfigureDVPort_TaskResponse{Returnval: task.Run()}}
}

// inSession: the port is a transmitted source or a destination of some session (the uses
// VspanPortPromiscChangeFault names; a received-only source may turn promiscuous).
func (s *VspanSwitch) inSession(key string) bool {
	for _, session := range s.Config.(*types.VMwareDVSConfigInfo).VspanSession {
		if contains(append(portKeys(session.SourcePortTransmitted), portKeys(session.DestinationPort)...), key) {
			return true
		}
	}
	return false
}

// ReconfigureDvsTask applies vspanConfigSpec (VMwareDVSConfigSpec.vspanConfigSpec, a list of
// VMwareDVSVspanConfigSpec add/edit/remove) all or nothing, checks configVersion first, and
// hands host membership changes to the stock simulator.
func (s *VspanSwitch) ReconfigureDvsTask(ctx *simulator.Context, req *types.ReconfigureDvs_Task) soap.HasFault {
	task := simulator.CreateTask(s, "reconfigureDvs", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		config := s.Config.(*types.VMwareDVSConfigInfo)
		spec := req.Spec.GetDVSConfigSpec()
		// DVSConfigSpec.configVersion: "required in reconfiguring a switch"; a spec made from an
		// older version fails with ConcurrentAccess (listed under ReconfigureDvs_Task's faults).
		if spec.ConfigVersion == "" {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.configVersion"}
		}
		if spec.ConfigVersion != config.ConfigVersion {
			return nil, &types.ConcurrentAccess{}
		}
		var vspan []types.VMwareDVSVspanConfigSpec
		if v, ok := req.Spec.(*types.VMwareDVSConfigSpec); ok {
			vspan = v.VspanConfigSpec
		}
		// ReconfigureDvs_Task's required privileges: "DVSwitch.Vspan if
		// VMwareDVSConfigSpec.vspanConfigSpec is set"; without it vCenter raises NoPermission
		// naming the object and the privilege (NoPermission.privilegeId).
		if len(vspan) > 0 && s.denyVspan {
			return nil, &types.NoPermission{Object: s.Self, PrivilegeId: "DVSwitch.Vspan"}
		}
		if len(spec.Host) > 0 {
			if fault := s.reconfigureHosts(req); fault != nil {
				return nil, fault
			}
		}
		changes := []types.PropertyChange{}
		if len(vspan) > 0 {
			portsMu.Lock()
			sessions, fault := s.applyVspan(config.VspanSession, vspan)
			portsMu.Unlock()
			if fault != nil {
				return nil, fault
			}
			config.VspanSession = sessions
			changes = append(changes, types.PropertyChange{Name: "config.vspanSession", Val: sessions})
			names := []string{}
			for _, change := range vspan {
				names = append(names, change.Operation+" "+change.VspanSession.Name)
			}
			logReconfigure(ctx, "ReconfigureDvs_Task", names)
		}
		version, _ := strconv.Atoi(config.ConfigVersion)
		config.ConfigVersion = strconv.Itoa(version + 1)
		changes = append(changes, types.PropertyChange{Name: "config.configVersion", Val: config.ConfigVersion})
		// Registry.Update tells the property collectors (WaitForUpdatesEx) about the change.
		simulator.Map.Update(s, changes)
		return nil, nil
	})
	return &methods.ReconfigureDvs_TaskBody{Res: &types.ReconfigureDvs_TaskResponse{Returnval: task.Run()}}
}

// reconfigureHosts runs the stock host membership change (its own task) and returns its fault.
func (s *VspanSwitch) reconfigureHosts(req *types.ReconfigureDvs_Task) types.BaseMethodFault {
	body := s.DistributedVirtualSwitch.ReconfigureDvsTask(req).(*methods.ReconfigureDvs_TaskBody)
	inner := simulator.Map.Get(body.Res.Returnval).(*simulator.Task)
	if inner.Info.Error != nil {
		return inner.Info.Error.Fault
	}
	return nil
}
