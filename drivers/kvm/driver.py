"""KvmDriver: VMs from libvirt, mirrors on their host-side devices.

A running domain's NIC is a host device (vnetN, or the target dev libvirt
was given). What the VM sends, the host device receives: VM `out` is the
device's ingress hook, VM `in` its egress hook. Two backends:

- tc (default): vtap's Linux dataplane on that device; works whatever the
  NIC is plugged into (Linux bridge, OVS, nothing).
- ovs: OVS Mirror rows for NICs on Open vSwitch bridges (see ovs.py); chosen
  with --backend ovs, or automatically for gre/erspan targets, which the
  kernel here cannot make as devices but OVS can as tunnel ports.

A VM that is not running has no device: its flows plan to nothing (the
follower applies them when it starts). Mistakes in what the user named are
refused before anything changes.
"""

from __future__ import annotations

import dataclasses
import threading

from vtap_core.driver import Binding, Description, Driver, Features
from vtap_core.errors import NotFound, Unsupported, ValidationError
from vtap_core.model import VM, Direction, TapFlow, TapSession
from vtap_drivers.kvm import DEFAULT_URI
from vtap_drivers.kvm.connection import Libvirt
from vtap_drivers.kvm.domains import vm_of
from vtap_drivers.kvm.ovs import Ovs, mirror_binding, tunnel_binding

OVS_TARGETS = {"port", "vm", "gre", "erspan", "vxlan"}


class KvmDriver(Driver):
    name = "kvm"

    def __init__(self, uri=None, ovsdb=None, state_dir=None, **settings):
        super().__init__(uri=uri, ovsdb=ovsdb, state_dir=state_dir, **settings)
        self.uri = uri or DEFAULT_URI
        self.state_dir = state_dir
        self.libvirt = Libvirt(self.uri)
        self.ovs = Ovs(ovsdb)
        self._tc = None

    # The follower sets this (vtap_core.metrics.PrometheusMetrics) to count reconnects.
    @property
    def metrics(self):
        return self.libvirt.metrics

    @metrics.setter
    def metrics(self, value):
        self.libvirt.metrics = value

    @property
    def tc(self):
        if self._tc is None:
            from vtap_drivers.kvm.tc import TcBackend

            self._tc = TcBackend(state_dir=self.state_dir)
        return self._tc

    def describe(self) -> Description:
        tc = self.tc.features
        features = Features(
            targets=tc.targets | OVS_TARGETS,
            sources=frozenset({"vm"}),
            filter=True,
            sample=tc.sample,
            snaplen_targets=tc.snaplen_targets | OVS_TARGETS,
            backends=("tc", "ovs"),
        )
        return Description(self.name, "KVM/libvirt guests; tc or Open vSwitch data path", features, {"uri": self.uri})

    # inventory -------------------------------------------------------------

    def inventory(self) -> list[VM]:
        def read(conn):
            host = conn.getHostname()
            vms = []
            for dom in conn.listAllDomains():
                try:
                    vms.append(vm_of(dom.UUIDString(), dom.name(), dom.state()[0], dom.XMLDesc(), host))
                except Exception as exc:  # undefined between list and read: skip it
                    if getattr(exc, "get_error_code", lambda: None)() != 42:  # VIR_ERR_NO_DOMAIN
                        raise
            return vms

        return self.libvirt.call(read)

    # plan ------------------------------------------------------------------

    def plan(self, sessions, flows) -> list[Binding]:
        sessions = list(sessions)
        flows = list(flows)
        if not flows and not any(s.target.kind == "vm" for s in sessions):
            return self._session_bindings(sessions, {}, flows)
        vms = self.inventory()
        by_uuid = {vm.uuid: vm for vm in vms}
        by_name = {}
        for vm in vms:
            by_name.setdefault(vm.name, []).append(vm)
        bindings = []
        for session in sessions:
            members = [f for f in flows if f.session == session.name]
            target_device = self._target_device(session, by_uuid)
            backend = self._backend(session, members)
            output = None
            for flow in members:
                vm = self._source_vm(flow, by_uuid, by_name)
                if session.target.kind == "vm" and session.target.vm == vm.uuid:
                    raise ValidationError("target", f"{session.target} is the source of flow {flow.name} itself; mirror to another VM")
                nics = self._source_nics(flow, vm)
                if target_device is False:
                    continue  # the monitoring VM is not running: nowhere to deliver now
                for nic in nics:
                    if not nic.device:
                        continue  # not running: no device now
                    if backend == "ovs":
                        bridge = self.ovs.bridge_of(nic.device)
                        if bridge is None:
                            raise Unsupported(self.name, "backend ovs for this NIC", f"{nic.device} of VM {vm.name} is not on an Open vSwitch bridge (use --backend tc)")
                        output = self._ovs_output(session, bridge, target_device, bindings)
                        bindings.append(mirror_binding(session.name, flow.name, vm.uuid, bridge, nic.device, flow.direction.value, output, session.snaplen))
                    else:
                        bindings.extend(self.tc.plan_flow(session, flow, nic.device, target_device, vm.uuid))
            if backend == "tc" and target_device is not False:
                bindings = [b for b in bindings if b.session != session.name or b.flow is not None] + [
                    b for b in self.tc.plan_session(session, target_device) if b.session == session.name
                ] + [b for b in bindings if b.session == session.name and b.flow is None]
        return _unique(bindings)

    def _session_bindings(self, sessions, by_uuid, flows):
        bindings = []
        for session in sessions:
            self._backend(session, [])
            if self._backend(session, []) == "tc":
                bindings.extend(self.tc.plan_session(session, None))
        return bindings

    def _source_vm(self, flow: TapFlow, by_uuid: dict, by_name: dict) -> VM:
        name = flow.source.vm
        if name in by_uuid:
            return by_uuid[name]
        matches = by_name.get(name, [])
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"vm: no VM with UUID or name {name!r} at {self.uri}")
        raise ValidationError("vm", f"{len(matches)} VMs are named {name!r}: give the UUID")

    def _source_nics(self, flow: TapFlow, vm: VM):
        if not vm.nics:
            raise ValidationError("vm", f"VM {vm.name} ({vm.uuid}) has no network interfaces")
        if flow.source.nic is None:
            return vm.nics
        nics = [n for n in vm.nics if n.mac == flow.source.nic]
        if not nics:
            macs = ", ".join(n.mac for n in vm.nics)
            raise ValidationError("nic", f"{flow.source.nic} is not a NIC of VM {vm.name} (its NICs: {macs})")
        return nics

    def _target_device(self, session: TapSession, by_uuid: dict):
        """The host device copies go to: a port name, a monitoring VM's vnetN, None for tunnels/pcap, False if that VM is down."""
        target = session.target
        if target.kind == "port":
            return target.port
        if target.kind != "vm":
            return None
        vm = by_uuid.get(target.vm)
        if vm is None:
            raise NotFound(f"target: no VM with UUID {target.vm} at {self.uri}")
        if not vm.nics:
            raise ValidationError("target", f"VM {vm.name} ({vm.uuid}) has no network interfaces")
        nics = [n for n in vm.nics if target.mac is None or n.mac == target.mac]
        if not nics:
            raise ValidationError("target", f"{target.mac} is not a NIC of VM {vm.name} (its NICs: {', '.join(n.mac for n in vm.nics)})")
        return nics[0].device or False

    def _backend(self, session: TapSession, flows) -> str:
        backend = session.backend
        if backend is None:
            backend = "ovs" if session.target.kind in ("gre", "erspan") and self.ovs.available() else "tc"
        if backend == "ovs":
            if session.target.kind not in OVS_TARGETS:
                raise Unsupported(self.name, f"target {session.target.kind}: with backend ovs", f"ovs targets are {', '.join(sorted(OVS_TARGETS))}")
            if session.sample not in (None, 1):
                raise Unsupported(self.name, "sample with backend ovs", "OVS mirrors copy every packet (use --backend tc)")
            for flow in flows:
                if flow.filter:
                    raise Unsupported(self.name, "filter expressions with backend ovs", "an OVS mirror selects whole ports (use --backend tc)")
        elif backend == "tc":
            self.tc.check_session(session)
        else:
            raise Unsupported(self.name, f"backend {backend}", "allowed: tc, ovs")
        return backend

    def _ovs_output(self, session: TapSession, bridge: str, target_device, bindings: list) -> str:
        if session.target.is_tunnel:
            tunnel = tunnel_binding(session.name, bridge, session.target)
            bindings.append(tunnel)
            return tunnel.get("port")
        if self.ovs.bridge_of(target_device) != bridge:
            raise ValidationError("target", f"{session.target}: with backend ovs the target must be a port on bridge {bridge}")
        return target_device

    # observe / apply / remove ----------------------------------------------

    def observe(self) -> list[Binding]:
        devices = {}
        for vm in self.inventory():
            for nic in vm.nics:
                if nic.device:
                    devices[nic.device] = vm.uuid
        found = [b for b in self.tc.observe(devices) if b.vm is None or b.vm in devices.values()]
        if self.ovs.available():
            # Only mirrors on this libvirt's devices (another libvirtd on this machine has its own).
            found.extend(b for b in self.ovs.observe() if b.vm is None or b.get("device") in devices)
        return found

    def apply(self, bindings) -> None:
        for binding in bindings:
            if binding.key.startswith("ovs/"):
                self.ovs.apply(binding)
            else:
                self.tc.apply([binding])

    def remove(self, bindings) -> None:
        for binding in bindings:
            if binding.key.startswith("ovs/"):
                self.ovs.remove(binding)
            else:
                self.tc.remove([binding])

    def watch(self, stop: threading.Event):
        return self.libvirt.watch(stop)

    def close(self) -> None:
        self.libvirt.close()
        self.ovs.close()


def _unique(bindings: list[Binding]) -> list[Binding]:
    seen = {}
    for binding in bindings:
        seen.setdefault(binding.key, binding)
    return list(seen.values())
