package main

// Port mirroring sessions, as the vSphere Web Services API reference describes them:
// VMwareVspanSession (data object), VMwareVspanPort, VMwareDVSVspanConfigSpec, and the
// faults ReconfigureDvs_Task raises for them (VspanSameSessionPortConflict, VspanDestPortConflict,
// VspanPortConflict, VspanPromiscuousPortNotSupported, NoPermission, InvalidArgument).
//
// Session names are not unique: VMwareVspanSession.name is only "the display name" and the
// session's identifier is its generated key; ReconfigureDvs_Task's DuplicateName fault is about
// the switch's own name (DVSConfigSpec.name). vCenter accepts two sessions with one name, so
// this simulator does too (a client must find its sessions by key or by a mark of its own).

import (
	"strconv"

	"github.com/vmware/govmomi/vim25/types"
)

// applyVspan returns the session list after the add/edit/remove specs, or the first fault;
// nothing is stored on a fault. Caller holds portsMu.
func (s *VspanSwitch) applyVspan(current []types.VMwareVspanSession, specs []types.VMwareDVSVspanConfigSpec) ([]types.VMwareVspanSession, types.BaseMethodFault) {
	sessions := append([]types.VMwareVspanSession(nil), current...)
	next := s.nextSession
	for _, spec := range specs {
		session := spec.VspanSession
		index := -1
		for i := range sessions {
			if session.Key != "" && sessions[i].Key == session.Key {
				index = i
			}
		}
		switch types.ConfigSpecOperation(spec.Operation) {
		case types.ConfigSpecOperationAdd:
			// VMwareVspanSession.key: "The generated key as the identifier for the session".
			next++
			session.Key = "vspan-" + strconv.Itoa(next)
			sessions = append(sessions, session)
		case types.ConfigSpecOperationEdit:
			if index < 0 {
				return nil, &types.InvalidArgument{InvalidProperty: "vspanConfigSpec.vspanSession.key"}
			}
			sessions[index] = session
		case types.ConfigSpecOperationRemove:
			if index < 0 {
				return nil, &types.InvalidArgument{InvalidProperty: "vspanConfigSpec.vspanSession.key"}
			}
			sessions = append(sessions[:index], sessions[index+1:]...)
		default:
			return nil, &types.InvalidArgument{InvalidProperty: "vspanConfigSpec.operation"}
		}
	}
	if fault := s.checkSessions(sessions); fault != nil {
		return nil, fault
	}
	s.nextSession = next
	return sessions, nil
}

func (s *VspanSwitch) checkSessions(sessions []types.VMwareVspanSession) types.BaseMethodFault {
	destinations := map[string]string{} // port key -> session key
	for i := range sessions {
		session := &sessions[i]
		if session.Name == "" {
			return &types.InvalidArgument{InvalidProperty: "vspanSession.name"}
		}
		if fault := s.checkSession(session); fault != nil {
			return fault
		}
		// VspanDestPortConflict: "Thrown if a DistributedVirtualPort appears as destination
		// port in multiple Distributed Port Mirroring sessions."
		for _, key := range portKeys(session.DestinationPort) {
			if other, taken := destinations[key]; taken {
				return &types.VspanDestPortConflict{VspanSessionKey1: other, VspanSessionKey2: session.Key, PortKey: key}
			}
			destinations[key] = session.Key
		}
	}
	// VspanPortConflict: "Thrown if a DistributedVirtualPort appears in both the transmitted
	// source and destination ports of any Distributed Port Mirroring session."
	for i := range sessions {
		for _, key := range portKeys(sessions[i].SourcePortTransmitted) {
			if other, taken := destinations[key]; taken {
				return &types.VspanPortConflict{VspanSessionKey1: sessions[i].Key, VspanSessionKey2: other, PortKey: key}
			}
		}
	}
	return nil
}

func (s *VspanSwitch) checkSession(session *types.VMwareVspanSession) types.BaseMethodFault {
	// VMwareVspanSession.mirroredPacketLength: "The value cannot be less than 60."
	if session.MirroredPacketLength != 0 && session.MirroredPacketLength < 60 {
		return &types.InvalidArgument{InvalidProperty: "vspanSession.mirroredPacketLength"}
	}
	// VMwareVspanSession.samplingRate: "Valid values are between 1 to 65535" (0: unset).
	if session.SamplingRate < 0 || session.SamplingRate > 65535 {
		return &types.InvalidArgument{InvalidProperty: "vspanSession.samplingRate"}
	}
	// sessionType "is required for vSphere Distributed Switch 5.1 and later".
	kind := types.VMwareDVSVspanSessionType(session.SessionType)
	switch kind {
	case types.VMwareDVSVspanSessionTypeDvPortMirror, types.VMwareDVSVspanSessionTypeMixedDestMirror,
		types.VMwareDVSVspanSessionTypeRemoteMirrorSource, types.VMwareDVSVspanSessionTypeRemoteMirrorDest,
		types.VMwareDVSVspanSessionTypeEncapsulatedRemoteMirrorSource:
	default:
		return &types.InvalidArgument{InvalidProperty: "vspanSession.sessionType"}
	}
	sources := append(portKeys(session.SourcePortTransmitted), portKeys(session.SourcePortReceived)...)
	for _, key := range sources {
		if _, ok := s.ports[key]; !ok {
			return &types.InvalidArgument{InvalidProperty: "vspanSession.sourcePort.portKey"}
		}
	}
	// VspanPromiscuousPortNotSupported: "Thrown when a promiscuous port is used as
	// transmitted source or destination in a Distributed Port Mirroring session." A port that
	// is only a received source may be promiscuous.
	for _, key := range portKeys(session.SourcePortTransmitted) {
		if s.promiscuous(key) {
			return &types.VspanPromiscuousPortNotSupported{VspanSessionKey: session.Key, PortKey: key}
		}
	}
	// VMwareVspanPort.uplinkPortName: "A fault will be raised if uplinkPortName is used as
	// source ports in any Distributed Port Mirroring session."
	for _, ports := range []*types.VMwareVspanPort{session.SourcePortTransmitted, session.SourcePortReceived} {
		if ports != nil && len(ports.UplinkPortName) > 0 {
			return &types.InvalidArgument{InvalidProperty: "vspanSession.sourcePort.uplinkPortName"}
		}
	}
	destinations := portKeys(session.DestinationPort)
	for _, key := range destinations {
		p, ok := s.ports[key]
		// "For all sessions except mixedDestMirror sessions, you cannot use uplink
		// distributed virtual ports as destination ports."
		if !ok || (p.uplink && kind != types.VMwareDVSVspanSessionTypeMixedDestMirror) {
			return &types.InvalidArgument{InvalidProperty: "vspanSession.destinationPort.portKey"}
		}
		if s.promiscuous(key) {
			return &types.VspanPromiscuousPortNotSupported{VspanSessionKey: session.Key, PortKey: key}
		}
		// VspanSameSessionPortConflict: "Thrown if a DistributedVirtualPort appears in both the
		// source and destination ports of the same Distributed Port Mirroring session."
		if contains(sources, key) {
			return &types.VspanSameSessionPortConflict{VspanSessionKey: session.Key, PortKey: key}
		}
	}
	if session.DestinationPort != nil && len(session.DestinationPort.WildcardPortConnecteeType) > 0 {
		return &types.InvalidArgument{InvalidProperty: "vspanSession.destinationPort.wildcardPortConnecteeType"}
	}
	// VMwareVspanSession's table of session types: remoteMirrorSource sends to "Uplink Ports
	// Name" only; uplink names are destinations of mixedDestMirror and remoteMirrorSource only.
	if session.DestinationPort != nil && len(session.DestinationPort.UplinkPortName) > 0 &&
		kind != types.VMwareDVSVspanSessionTypeMixedDestMirror && kind != types.VMwareDVSVspanSessionTypeRemoteMirrorSource {
		return &types.InvalidArgument{InvalidProperty: "vspanSession.destinationPort.uplinkPortName"}
	}
	if kind == types.VMwareDVSVspanSessionTypeRemoteMirrorSource && (len(destinations) > 0 ||
		session.DestinationPort == nil || len(session.DestinationPort.UplinkPortName) == 0 || len(session.DestinationPort.IpAddress) > 0) {
		return &types.InvalidArgument{InvalidProperty: "vspanSession.destinationPort"}
	}
	if session.DestinationPort != nil {
		for _, name := range session.DestinationPort.UplinkPortName {
			if !s.hasUplinkName(name) {
				return &types.InvalidArgument{InvalidProperty: "vspanSession.destinationPort.uplinkPortName"}
			}
		}
	}
	if kind == types.VMwareDVSVspanSessionTypeEncapsulatedRemoteMirrorSource {
		// VMwareVspanPort.ipAddress: "IP address for the destination of encapsulated remote
		// mirror source session"; VMwareVspanSession.encapType: gre, erspan2, erspan3.
		if session.DestinationPort == nil || len(session.DestinationPort.IpAddress) == 0 {
			return &types.InvalidArgument{InvalidProperty: "vspanSession.destinationPort.ipAddress"}
		}
		switch session.EncapType {
		case "", "gre":
		case "erspan2", "erspan3":
			caps := s.Capability.FeaturesSupported.(*types.VMwareDVSFeatureCapability).VspanCapability
			if caps.ErspanProtocolSupported == nil || !*caps.ErspanProtocolSupported {
				return &types.InvalidArgument{InvalidProperty: "vspanSession.encapType"}
			}
			// ERSPAN session ID is a 10-bit field (VMwareVspanSession.erspanId).
			if session.ErspanId < 0 || session.ErspanId > 1023 {
				return &types.InvalidArgument{InvalidProperty: "vspanSession.erspanId"}
			}
		default:
			return &types.InvalidArgument{InvalidProperty: "vspanSession.encapType"}
		}
	}
	return nil
}

func (s *VspanSwitch) hasUplinkName(name string) bool {
	for _, p := range s.ports {
		if p.uplink && p.Config.Name == name {
			return true
		}
	}
	return false
}

// portKeys is a copy: callers append to it.
func portKeys(ports *types.VMwareVspanPort) []string {
	if ports == nil {
		return nil
	}
	return append([]string(nil), ports.PortKey...)
}
