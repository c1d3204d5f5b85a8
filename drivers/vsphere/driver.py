"""The vsphere driver: TapSessions as vDS port mirroring sessions (VspanSession).

One TapSession becomes one VMwareVspanSession per distributed switch its
sources are on, named vtap:<session>; sessions with other names are never
read into vtap's state, edited or removed. See mirror.py for the mapping
(and for which way is "in" and "out"), inventory.py for how VMs and switches
are read, watch.py for the follower's event source.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import defaultdict
from dataclasses import replace
from typing import Iterable, Iterator

import tenacity
from pyVmomi import vim, vmodl

from vtap_core.driver import Binding, Description, Driver, Features
from vtap_core.errors import NotFound, OperationFailed, TemporaryError, Unsupported, ValidationError
from vtap_core.model import Direction, TapFlow, TapSession, VM
from vtap_drivers.vsphere import inventory, mirror, watch
from vtap_drivers.vsphere.tagging import Tagging
from vtap_drivers.vsphere.connection import LOST, Connection, fault_text

TAG_POLL = 10.0  # seconds between the follower's reads of vSphere tags (the vAPI has no change events)
PLAN_READ_AGE = 2.0  # at most, seconds a VM's version read serves further plans (see inventory.Reader)
MIN_SNAPLEN = 60  # VMwareVspanSession.mirroredPacketLength "cannot be less than 60"
MAX_SAMPLE = 65535  # VMwareVspanSession.samplingRate: "Valid values are between 1 to 65535"
EPHEMERAL = "ephemeral"  # DistributedVirtualPortgroupPortgroupType
FEATURES = Features(
    selector_keys=frozenset({"name", "tag", "folder", "host", "network"}),  # tag: vSphere tags, else custom attributes
    central_manager=True,  # one vCenter for many hosts: one elected follower applies
    targets=frozenset({"vm", "port", "gre", "erspan"}),
    sources=frozenset({"vm"}),
    filter=False,
    sample=True,
    snaplen_targets=frozenset({"vm", "port", "gre", "erspan"}),
)


class VsphereDriver(Driver):
    name = "vsphere"

    def __init__(self, url=None, user=None, password=None, insecure=False, state_dir=None):
        super().__init__(url=url, user=user, insecure=insecure, state_dir=state_dir)  # no password kept here
        self.connection = Connection(url, user, password, insecure)
        self.tagging = Tagging(url, user, password, insecure)
        self._tags_seen = None  # the last read of tag attachments (moref id -> tags)
        self._tags_polled = 0.0
        self._views = {}  # (connection number, type) -> ContainerView
        self._vm_refs = {}  # UUID -> VirtualMachine moref (stable in one vCenter)
        self._vms = inventory.vm_reader(with_host=True, max_age=PLAN_READ_AGE)  # the host: see _refuse_other_host
        self._listing = inventory.listing_reader()
        self._switch_reader = inventory.switch_reader()
        # Instance UUIDs of every VM planned as a vm: target (read by watch). Only added to: plans
        # come per flow too, and a VM that stopped being one costs at most a needless resync.
        self._monitoring = frozenset()

    # describe / inventory ----------------------------------------------------

    def describe(self) -> Description:
        return Description(
            name=self.name,
            summary="VMware vSphere: distributed switch port mirroring (VspanSession), followed through a PropertyCollector",
            features=FEATURES,
            connection={"url": self.connection.url, "user": self.connection.user, "insecure": self.connection.insecure},
        )

    def check_features(self, session: TapSession, flows: Iterable[TapFlow]) -> None:
        flows = list(flows)
        self._refuse_filters(flows)
        super().check_features(session, flows)

    def _refuse_filters(self, flows) -> None:
        for flow in flows:
            if flow.filter:
                raise Unsupported(
                    self.name,
                    "filter expressions",
                    f"flow {flow.name}: a vDS mirrors whole ports, so '{flow.filter}' cannot be honoured; "
                    "vtap will not mirror more than asked (drop --filter)",
                )

    def inventory(self) -> list[VM]:
        def read(content):
            found = self._listing.read(content, self._view(content, vim.VirtualMachine), True)
            names = inventory.names_of(content, self._view)
            attached = self.tagging.attachments()
            if attached is not None and self._tags_seen is None:
                # The tag poll's baseline: the follower's first plan (a full resync) saw these. Later
                # plans do not move it: a plan scoped to one VM applies no other VM's new tags.
                self._tags_seen = attached
            vms = []
            for ref, props in found.items():
                vm = inventory.vm_record(ref, props).to_vm()
                nics = tuple(replace(n, details={**n.details, "network_name": names.get(n.network)}) for n in vm.nics)
                folder = names.get(f"folder:{getattr(props.get('parent'), '_moId', None)}")
                if attached is None:
                    tags, source = inventory.custom_attributes(content, props.get("customValue")), "custom-attributes"
                else:
                    tags, source = attached.get(ref._moId, ()), "vapi"
                details = {**vm.details, "host_name": names.get(vm.host), "tags_from": source}
                vms.append(replace(vm, nics=nics, folder=folder, tags=tags, details=details))
            return sorted(vms, key=lambda vm: vm.name)

        return self._call(read)

    # plan ------------------------------------------------------------------

    def plan(self, sessions: Iterable[TapSession], flows: Iterable[TapFlow]) -> list[Binding]:
        sessions, flows = list(sessions), list(flows)
        for session in sessions:
            self._check_session(session)
        self._refuse_filters(flows)
        return self._call(lambda content: self._plan(content, sessions, flows))

    def _check_session(self, session: TapSession) -> None:
        """What can be refused without asking vCenter."""
        target = session.target
        if session.snaplen is not None and session.snaplen < MIN_SNAPLEN:
            raise ValidationError("snaplen", f"{session.snaplen} is below {MIN_SNAPLEN}: vDS mirroredPacketLength cannot be less than {MIN_SNAPLEN}")
        if session.sample is not None and session.sample > MAX_SAMPLE:
            raise ValidationError("sample", f"{session.sample} is above {MAX_SAMPLE}: vDS samplingRate takes 1 to {MAX_SAMPLE}")
        if target.kind not in FEATURES.targets:
            raise Unsupported(self.name, f"target {target.kind}:", "targets here are erspan, gre, port, vm")
        if target.kind in ("gre", "erspan"):
            try:
                ipaddress.ip_address(target.host)
            except ValueError:
                raise ValidationError("target", f"{target.host!r}: vSphere sends encapsulated mirrors to an IP address, not a host name") from None
        if target.kind == "gre" and target.key is not None:
            raise Unsupported(self.name, "gre key", "vDS GRE mirror packets carry no key (drop ?key=)")

    def _plan(self, content, sessions, flows) -> list[Binding]:
        wanted = [f.source.vm for f in flows] + [s.target.vm for s in sessions if s.target.kind == "vm"]
        records = self._resolve(content, wanted)
        self._monitoring |= {records[s.target.vm].uuid for s in sessions if s.target.kind == "vm"}
        switches = self._switches(content)
        self._refuse_ephemeral(content, records, sessions, flows)
        bindings = []
        checks = defaultdict(dict)  # switch uuid -> {port key: what it is, for error messages}
        for session in sessions:
            members = [f for f in flows if f.session == session.name]
            bindings.extend(self._session_bindings(session, members, records, switches, checks))
        for uuid, ports in checks.items():
            # vSphere keeps a port that is a transmitted source or a destination of a mirror session
            # from turning promiscuous (VspanPortPromiscChangeFault), so only ports new to those
            # roles need a look.
            mirrored = {key for vspan in switches[uuid].sessions for key in mirror.promiscuous_guarded(vspan)}
            self._refuse_promiscuous(switches[uuid], {k: v for k, v in ports.items() if k not in mirrored})
        return bindings

    def _session_bindings(self, session, flows, records, switches, checks) -> list[Binding]:
        """One binding per flow and switch: the session's options on that switch plus the flow's ports."""
        per_flow = []  # (flow, VM record, {switch uuid: ports})
        sources = defaultdict(lambda: {"transmitted": set(), "received": set()})
        for flow in flows:
            record = records[flow.source.vm]
            ports = self._flow_ports(record, flow, checks)
            per_flow.append((flow, record, ports))
            for uuid, keys in ports.items():
                sources[uuid]["transmitted"] |= keys["transmitted"]
                sources[uuid]["received"] |= keys["received"]
        if session.target.kind == "vm":
            self._target_nic(session, records)  # refuse a bad target even before flows exist
        options = {}
        for uuid, ports in sources.items():
            switch = switches.get(uuid)
            if switch is None:
                raise NotFound(f"switch {uuid}: not found in vCenter (sources of session {session.name} are on it)")
            destination = self._destination(session, switch, records, ports)
            host = destination.pop("host", None)
            apart = [record for flow, record, flow_ports in per_flow if uuid in flow_ports and not _same_host(record, host)]
            if apart and session.target.encap == "erspan":
                destination = self._erspan_to_monitor(session, switch, records)
            for record in apart if destination["session_type"] == mirror.DV_PORT_MIRROR else ():
                self._refuse_other_host(session, record, host)
            for key in destination.get("ports", ()):
                checks[uuid][key] = f"target {session.target}"
            options[uuid] = mirror.make_options(**destination, snaplen=session.snaplen, sample=session.sample)
        return [
            Binding(
                key=mirror.flow_key(uuid, session.name, flow.name),
                session=session.name,
                flow=flow.name,
                vm=record.uuid,
                spec=mirror.flow_spec(options[uuid], keys["transmitted"], keys["received"]),
            )
            for flow, record, ports in per_flow
            for uuid, keys in ports.items()
        ]

    def _flow_ports(self, record, flow, checks) -> dict:
        """{switch uuid: {"transmitted": port keys, "received": port keys}} of one flow."""
        ports = defaultdict(lambda: {"transmitted": set(), "received": set()})
        for nic in self._source_nics(record, flow):
            if flow.direction.includes(Direction.OUT):
                ports[nic.switch_uuid]["received"].add(nic.port_key)  # see mirror.py: the port receives what the VM sends
            if flow.direction.includes(Direction.IN):
                ports[nic.switch_uuid]["transmitted"].add(nic.port_key)
                # Only a transmitted source must not be promiscuous (VspanPromiscuousPortNotSupported:
                # "a promiscuous port is used as transmitted source or destination").
                checks[nic.switch_uuid][nic.port_key] = f"source VM {record.name} NIC {nic.mac}"
        return ports

    def _source_nics(self, record, flow):
        nics = [n for n in record.nics if flow.source.nic is None or n.mac == flow.source.nic]
        if flow.source.nic and not nics:
            have = ", ".join(n.mac for n in record.nics) or "none"
            raise NotFound(f"nic {flow.source.nic}: VM {record.name} has no NIC with this MAC (it has {have})")
        on_switch = [n for n in nics if n.switch_uuid and n.port_key]
        if not on_switch:
            raise ValidationError("vm", f"VM {record.name}: no NIC{' ' + flow.source.nic if flow.source.nic else ''} is on a distributed switch port; vDS port mirroring needs one")
        return on_switch

    def _target_nic(self, session, records):
        target = session.target
        record = records[target.vm]
        nics = [n for n in record.nics if n.switch_uuid and n.port_key and (target.mac is None or n.mac == target.mac)]
        if not nics:
            raise NotFound(f"target: VM {record.name} has no NIC{' ' + target.mac if target.mac else ''} on a distributed switch port")
        if len(nics) > 1:
            raise ValidationError("target", f"VM {record.name} has {len(nics)} NICs on distributed switches; name one: vm:{target.vm}#MAC")
        return record, nics[0]

    def _destination(self, session, switch, records, sources) -> dict:
        target = session.target
        capability = switch.vspan
        if capability is None:
            raise Unsupported(self.name, f"port mirroring on switch {switch.name}", "its featuresSupported has no vspanSupported")
        if target.kind == "vm":
            record, nic = self._target_nic(session, records)
            if nic.switch_uuid != switch.uuid:
                raise ValidationError("target", f"monitoring VM {record.name} is on another switch than the sources on {switch.name}; a vDS mirror stays within one switch")
            if nic.port_key in sources["transmitted"] | sources["received"]:
                raise ValidationError("target", f"monitoring VM {record.name}'s port {nic.port_key} is also a source of session {session.name}")
            self._require(capability.dvportSupported, switch, "dvPortMirror sessions")
            return {"session_type": mirror.DV_PORT_MIRROR, "ports": [nic.port_key], "host": (record.host, f"monitoring VM {record.name}")}
        if target.kind == "port":
            destination = self._port_destination(target.port, switch, capability)
            if set(destination.get("ports", ())) & (sources["transmitted"] | sources["received"]):
                raise ValidationError("target", f"port {target.port} is also a source of session {session.name}")
            return destination
        self._require(capability.encapRemoteSourceSupported, switch, "encapsulated remote mirror sessions")
        if target.kind == "gre":
            return {"session_type": mirror.ENCAPSULATED, "ips": [target.host], "encap": "gre"}
        self._require(capability.erspanProtocolSupported, switch, "ERSPAN")
        return {"session_type": mirror.ENCAPSULATED, "ips": [target.host], "encap": f"erspan{target.version}", "erspan_id": target.erspan_id}

    def _port_destination(self, name, switch, capability) -> dict:
        """port:NAME is an uplink name (all hosts' uplinks of that name), a port key, or a port's name."""
        if name in switch.uplink_names:
            # remoteMirrorSource: "Distributed Ports can be used as source entities, and uplink ports
            # name can be used as destination entities" (VMwareDVSVspanSessionType); the copies leave
            # through the uplink of that name on each source's own host. mixedDestMirror is the
            # vSphere 5.0 session type the current vSphere Networking guide no longer offers.
            self._require(capability.remoteSourceSupported, switch, "uplink destinations (remoteMirrorSource)")
            return {"session_type": mirror.REMOTE_MIRROR_SOURCE, "uplinks": [name]}
        ports = switch.ref.FetchDVPorts(vim.dvs.PortCriteria(portKey=[name]))
        if not ports:
            ports = [p for p in switch.ref.FetchDVPorts(vim.dvs.PortCriteria()) if p.config and p.config.name == name]
        if not ports:
            raise NotFound(f"target: switch {switch.name} has no port key, port name or uplink name {name!r}")
        if len(ports) > 1:
            raise ValidationError("target", f"{len(ports)} ports on switch {switch.name} are named {name!r}; use a port key: {', '.join(p.key for p in ports)}")
        port = ports[0]
        if port.connectee is not None and port.connectee.type == "pnic":  # an uplink port
            uplink = port.config.name if port.config else None
            raise ValidationError(
                "target",
                f"port {port.key} is one host's uplink; vSphere mirrors to uplinks by name (remoteMirrorSource), "
                f"each source through its own host's uplink: use port:{uplink or 'UPLINK-NAME'}",
            )
        self._require(capability.dvportSupported, switch, "dvPortMirror sessions")
        host = getattr(port.proxyHost, "_moId", None)
        return {"session_type": mirror.DV_PORT_MIRROR, "ports": [port.key], "host": (host, f"target port {port.key}")}

    def _refuse_other_host(self, session, record, host) -> None:
        """A dvPortMirror session delivers only between ports on one ESXi host.

        vSphere accepts a session whose source and destination ports are on different hosts,
        and after a vMotion an existing one silently stops delivering (vSphere Networking guide,
        "Port Mirroring Interoperability"). Such a flow is refused here; in `status` and in the
        follower it becomes a problem of that flow and its ports leave the session, unless the
        target allows ERSPAN (vm:UUID?encap=erspan, see _erspan_to_monitor).
        """
        target_host, what = host
        allow = f"{session.target}?encap=erspan" if session.target.kind == "vm" else "erspan:// or gre:// to the monitoring VM's IP"
        raise ValidationError(
            "target",
            f"VM {record.name} runs on host {self._host_name(record.ref, record.host)} and {what} on host "
            f"{self._host_name(record.ref, target_host)}: a dvPortMirror session delivers only within one ESXi host; "
            f"move one of them, or let session {session.name} use ERSPAN ({allow})",
        )

    def _erspan_to_monitor(self, session, switch, records) -> dict:
        """An encapsulated session (ERSPAN type II, session id 0) to the monitoring VM NIC's IP address.

        The address comes from the guest's own report (GuestInfo.net: "Guest information about
        network adapters", VMware Tools); without it there is nowhere to send the copies.
        """
        record, nic = self._target_nic(session, records)
        self._require(switch.vspan.encapRemoteSourceSupported, switch, "encapsulated remote mirror sessions")
        self._require(switch.vspan.erspanProtocolSupported, switch, "ERSPAN")
        addresses = [a for n in (record.ref.guest.net or ()) if (n.macAddress or "").lower() == nic.mac for a in (n.ipAddress or ()) if _is_ip(a)]
        ipv4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        if not addresses:
            raise ValidationError(
                "target",
                f"monitoring VM {record.name} reports no IP address for NIC {nic.mac} (VMware Tools guest info); "
                f"session {session.name} cannot reach it by ERSPAN from another host",
            )
        return {"session_type": mirror.ENCAPSULATED, "ips": [(ipv4 or addresses)[0]], "encap": "erspan2", "erspan_id": 0}

    @staticmethod
    def _host_name(ref, moid) -> str:
        try:
            return vim.HostSystem(moid, ref._stub).name
        except vmodl.MethodFault:
            return moid

    def _refuse_ephemeral(self, content, records, sessions, flows) -> None:
        """Ports of ephemeral portgroups exist only while their VM is powered on.

        DistributedVirtualPortgroupPortgroupType ephemeral: a port "will be created and assigned to a
        VirtualMachine when the VirtualMachine is powered on and will be deleted when the
        VirtualMachine is powered off". A session naming such a port loses it at the next power cycle.
        """
        nics = [(records[f.source.vm], f.source.nic) for f in flows]
        nics += [(records[s.target.vm], s.target.mac) for s in sessions if s.target.kind == "vm"]
        used = {n.portgroup_key: (r, n) for r, mac in nics for n in r.nics if n.portgroup_key and mac in (None, n.mac)}
        if not used:
            return
        kinds = inventory.retrieve(content, self._view(content, vim.dvs.DistributedVirtualPortgroup), vim.dvs.DistributedVirtualPortgroup, ["key", "config.type", "name"], True)
        for props in kinds.values():
            if props.get("config.type") == EPHEMERAL and props.get("key") in used:
                record, nic = used[props["key"]]
                raise ValidationError(
                    "vm",
                    f"VM {record.name} NIC {nic.mac} is on ephemeral portgroup {props.get('name')}: its port is deleted at "
                    "power-off and a new one made at power-on, so a mirror session would lose it; use a static-binding portgroup",
                )

    def _require(self, supported, switch, feature):
        if not supported:
            raise Unsupported(self.name, f"{feature} on switch {switch.name}", "the switch's vspanCapability does not offer it")

    def _refuse_promiscuous(self, switch, ports: dict) -> None:
        """vSphere refuses promiscuous ports in mirror sessions; vtap says which and never changes the port."""
        if not ports:
            return
        for port in switch.ref.FetchDVPorts(vim.dvs.PortCriteria(portKey=sorted(ports))):
            setting = port.config.setting if port.config else None
            policy = getattr(setting, "securityPolicy", None)
            allow = getattr(policy, "allowPromiscuous", None)
            if allow is not None and allow.value:
                raise ValidationError(
                    f"port {port.key}",
                    f"{ports.get(port.key, 'port')} is on port {port.key} of switch {switch.name}, which is in promiscuous mode; "
                    "a vDS cannot mirror it and vtap never changes promiscuous mode",
                )

    # observe / apply / remove -------------------------------------------------

    def observe(self) -> list[Binding]:
        self._vms.invalidate()  # what was read for planning ends here (see inventory.Reader)

        def read(content):
            bindings = []
            for switch in self._switches(content).values():
                for vspan in mirror.ours(switch.sessions).values():
                    for key, session, flow, vm, spec in mirror.observed_flows(switch.uuid, vspan):
                        bindings.append(Binding(key=key, session=session, flow=flow, vm=vm, spec=spec))
            return bindings

        return self._call(read)

    def apply(self, bindings: Iterable[Binding]) -> None:
        for uuid, group in _by_switch(bindings).items():
            self._call(lambda content: self._reconfigure(content, uuid, group, self._upserts))

    def remove(self, bindings: Iterable[Binding]) -> None:
        for uuid, group in _by_switch(bindings).items():
            self._call(lambda content: self._reconfigure(content, uuid, group, self._removals, missing_ok=True))

    @staticmethod
    def _upserts(switch, group):
        """Ops that make each session carry these flows (and keep its other flows)."""
        existing = mirror.ours(switch.sessions)
        ops = []
        for session, members in _by_session(group).items():
            name = mirror.session_name(session)
            found = existing.get(name)
            mine = {b.flow for b in members}
            kept = [e for e in (mirror.parse_flows(found.description) if found is not None else ()) if e[0] not in mine]
            entries = kept + [mirror.entry(b.flow, b.vm, b.get("transmitted"), b.get("received")) for b in members]
            options = mirror.options_of_spec(members[0].spec)
            if found is not None and mirror.same(found, options, entries):
                continue  # already right: applying twice changes nothing
            vspan = mirror.to_vspan(name, options, entries, key=found.key if found is not None else None)
            ops.append(mirror.VSPAN.VspanConfigSpec(operation="edit" if found is not None else "add", vspanSession=vspan))
        return ops

    @staticmethod
    def _removals(switch, group):
        """Ops that take these flows out of their sessions; a session left without flows goes."""
        existing = mirror.ours(switch.sessions)
        ops = []
        for session, members in _by_session(group).items():
            found = existing.get(mirror.session_name(session))
            if found is None:
                continue  # deleting what is gone is not an error
            gone = {b.flow for b in members}
            entries = [e for e in mirror.parse_flows(found.description) if e[0] not in gone]
            if entries:
                vspan = mirror.to_vspan(found.name, mirror.options_of(found), entries, key=found.key)
                ops.append(mirror.VSPAN.VspanConfigSpec(operation="edit", vspanSession=vspan))
            else:
                ops.append(mirror.VSPAN.VspanConfigSpec(operation="remove", vspanSession=mirror.VSPAN.VspanSession(key=found.key, name=found.name)))
        return ops

    def _reconfigure(self, content, uuid, group, make_ops, missing_ok=False):
        """One ReconfigureDvs_Task per switch, made from a fresh read; a configVersion conflict is re-read and retried."""
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TemporaryError),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1),
            stop=tenacity.stop_after_attempt(6),
            reraise=True,
        ):
            with attempt:
                switch = self._switches(content).get(uuid)
                if switch is None:
                    if missing_ok:
                        return  # the switch is gone and its sessions with it
                    raise NotFound(f"switch {uuid}: not found in vCenter")
                ops = make_ops(switch, group)
                if not ops:
                    return
                spec = vim.dvs.VmwareDistributedVirtualSwitch.ConfigSpec(configVersion=switch.version, vspanConfigSpec=ops)
                try:
                    self.connection.wait(switch.ref.ReconfigureDvs_Task(spec))
                except vim.fault.ConcurrentAccess:
                    raise TemporaryError(f"switch {switch.name} changed while vtap was changing it") from None
                except vim.fault.NoPermission as fault:
                    # ReconfigureDvs_Task needs "DVSwitch.Vspan if VMwareDVSConfigSpec.vspanConfigSpec is set".
                    privilege = fault.privilegeId or "DVSwitch.Vspan"
                    raise OperationFailed(
                        f"vsphere: user {self.connection.user!r} lacks the privilege {privilege} on switch {switch.name}; "
                        "port mirroring sessions cannot be changed without it (grant a role that has it)"
                    ) from None
                except vmodl.MethodFault as fault:
                    names = ", ".join(sorted({mirror.session_name(b.session) for b in group}))
                    raise OperationFailed(f"vsphere: switch {switch.name} refused {names}: {fault_text(fault)}") from None

    # watch -----------------------------------------------------------------

    def watch(self, stop: threading.Event) -> Iterator[str | None]:
        while not stop.is_set():
            try:
                yield from watch.updates(
                    self.connection.content, stop, changed=self._vms.invalidate, monitoring=lambda uuid: uuid in self._monitoring, tick=self._retagged
                )
                return
            except LOST:
                self.connection.reconnect()
                self._views.clear()
                self._vms.invalidate()
                yield None  # events may have been missed: look at everything

    def _retagged(self) -> list[str]:
        """Moref ids of VMs whose vSphere tags changed since the poll's last read, every TAG_POLL seconds."""
        now = time.monotonic()
        if now - self._tags_polled < TAG_POLL:
            return []
        self._tags_polled = now
        attached = self.tagging.attachments()
        if attached is None:
            return []  # custom attributes: the watch sees customValue change
        before, self._tags_seen = self._tags_seen, attached
        if before is None:
            return []
        return sorted(moid for moid in set(before) | set(attached) if before.get(moid) != attached.get(moid))

    def close(self) -> None:
        self._views.clear()
        self._vms.forget()
        self._listing.forget()
        self._switch_reader.forget()
        self.tagging.close()
        self.connection.close()

    # reading helpers -------------------------------------------------------

    def _call(self, action):
        """connection.call, plus: a view that vanished with a lost session is made again."""
        try:
            return self.connection.call(action)
        except vmodl.fault.ManagedObjectNotFound as fault:
            if not isinstance(fault.obj, vim.view.ContainerView):
                raise
            self._views.clear()
            return self.connection.call(action)

    def _view(self, content, kind):
        key = (self.connection.connects, kind)
        if key not in self._views:
            self._views[key] = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
        return self._views[key]

    def _switches(self, content) -> dict:
        view = self._view(content, vim.dvs.VmwareDistributedVirtualSwitch)
        found = self._switch_reader.read(content, view, True)
        records = (inventory.switch_record(ref, props) for ref, props in found.items())
        return {r.uuid: r for r in records}

    def _resolve(self, content, names_or_uuids, fresh=False) -> dict:
        """{what the user gave: VmRecord}; a UUID is an instance UUID or a BIOS UUID."""
        if fresh:
            self._vm_refs.clear()
        wanted = sorted(set(names_or_uuids))
        refs = {}
        names = [w for w in wanted if inventory.parse_uuid(w) != w]
        for uuid in (w for w in wanted if w not in names):
            refs[uuid] = self._vm_refs.get(uuid) or self._find_by_uuid(content, uuid)
        if names:
            everything = inventory.retrieve(content, self._view(content, vim.VirtualMachine), vim.VirtualMachine, ["name"], True)
            for name in names:
                matches = [ref for ref, props in everything.items() if props.get("name") == name]
                if not matches:
                    raise NotFound(f"vm {name!r}: no VM with this name in vCenter {self.connection.url}")
                if len(matches) > 1:
                    raise ValidationError("vm", f"{len(matches)} VMs are named {name!r}; use the UUID")
                refs[name] = matches[0]
        try:
            found = self._vms.read(content, list(set(refs.values())))
        except vmodl.fault.ManagedObjectNotFound:
            found = {}
        if not fresh and any(ref not in found for ref in refs.values()):
            return self._resolve(content, names_or_uuids, fresh=True)  # a remembered VM is gone: look again
        records = {}
        for given, ref in refs.items():
            if ref not in found:
                raise NotFound(f"vm {given}: no longer in vCenter {self.connection.url}")
            records[given] = inventory.vm_record(ref, found[ref])
        return records

    def _find_by_uuid(self, content, uuid):
        index = content.searchIndex
        ref = index.FindByUuid(uuid=uuid, vmSearch=True, instanceUuid=True) or index.FindByUuid(uuid=uuid, vmSearch=True, instanceUuid=False)
        if ref is None:
            raise NotFound(f"vm {uuid}: no VM with this instance or BIOS UUID in vCenter {self.connection.url}")
        self._vm_refs[uuid] = ref
        return ref


def _is_ip(text) -> bool:
    try:
        return not ipaddress.ip_address(text).is_link_local  # a link-local address is not reachable from another host
    except ValueError:
        return False


def _same_host(record, host) -> bool:
    """Whether a source VM runs where the dvPortMirror destination is (True when either is unknown)."""
    return host is None or not record.host or not host[0] or record.host == host[0]


def _by_switch(bindings) -> dict:
    groups = defaultdict(list)
    for binding in bindings:
        groups[mirror.split_key(binding.key)[0]].append(binding)
    return groups


def _by_session(bindings) -> dict:
    groups = defaultdict(list)
    for binding in bindings:
        groups[binding.session].append(binding)
    return groups
