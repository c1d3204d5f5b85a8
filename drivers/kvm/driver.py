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

import threading
import time

import libvirt

from vtap_core.driver import Binding, Description, Driver, Features
from vtap_core.errors import NotFound, OperationFailed, TemporaryError, Unsupported, ValidationError
from vtap_core.model import VM, TapFlow, TapSession
from vtap_drivers.kvm import DEFAULT_URI
from vtap_drivers.kvm.connection import Libvirt
from vtap_drivers.kvm.devices import MACVTAP, PASSTHROUGH, device_kind, no_host_device
from vtap_drivers.kvm.domains import vm_of
from vtap_drivers.kvm.ovs import MAX_MIRRORS, Ovs, mirror_binding, tunnel_binding
from vtap_drivers.linux.dataplane import missing_tunnel_device

OVS_TARGETS = frozenset({"port", "vm", "gre", "erspan", "vxlan"})
TC_TARGETS = frozenset({"port", "vm", "vxlan", "pcap", "gre", "erspan"})  # gre/erspan: where the kernel has the devices
# Seconds one inventory read serves: a reconcile reads it for expand, plan and observe, and a
# command plans several times before it applies. Events and the end of observe() drop it.
INVENTORY_REUSE = 1.0


class KvmDriver(Driver):
    name = "kvm"

    def __init__(self, uri=None, ovsdb=None, state_dir=None, datapath=None, **settings):
        from vtap_drivers.linux.tcxmirror import check_datapath

        super().__init__(uri=uri, ovsdb=ovsdb, state_dir=state_dir, **settings)
        self.datapath = check_datapath(datapath)
        self.uri = uri or DEFAULT_URI
        self.state_dir = state_dir
        self.libvirt = Libvirt(self.uri)
        self.ovs = Ovs(ovsdb)
        self._tc = None
        self._parsed: dict = {}  # uuid -> (XML, state, VM) of the last inventory
        self._memo = None  # (time, VMs, full read?): one reconcile's expand, plan and observe share one read
        self._focus = threading.local()  # .vm: the VM this thread's reconcile is about (None: all); an agent reports status meanwhile
        self._known = None  # (event subscription, host, {uuid: VM}): the last full read, kept by events
        self._changed: set = set()  # domains with an event since: read again before _known is used
        self._changes = threading.Lock()  # watch() adds to _changed while a reconcile reads it
        self._events = 0  # events seen by watch(): a read that one crossed is not kept for the next reconcile
        self._reading = threading.Lock()  # one read at a time: a full read and a re-read must not cross (an agent's status runs beside its follower)
        self._kernel_kinds = None  # {device: IFLA_INFO_KIND}, read once per plan when a NIC's libvirt type leaves its kind open

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
            from vtap_drivers.linux.dataplane import TcDataplane

            self._tc = TcDataplane(state_dir=self.state_dir or ".", datapath=self.datapath)
        return self._tc

    def describe(self) -> Description:
        features = Features(
            targets=TC_TARGETS | OVS_TARGETS,
            sources=frozenset({"vm"}),
            filter=True,  # tc only (plan refuses filters with backend ovs)
            sample=True,  # tc only
            snaplen_targets=frozenset({"pcap"}) | OVS_TARGETS,  # pcap with tc; any with ovs
            backends=("tc", "ovs"),
            selector_keys=frozenset({"name", "tag", "host", "network"}),
        )
        return Description(self.name, "KVM/libvirt guests; tc or Open vSwitch data path", features, {"uri": self.uri})

    # inventory -------------------------------------------------------------

    def inventory(self) -> list[VM]:
        memo = self._memo
        if memo is not None and time.monotonic() - memo[0] <= INVENTORY_REUSE and (memo[2] or self._focused() is not None):
            return memo[1]  # (a re-read serves only reconciles about one VM: a resync reads everything)
        with self._reading:
            with self._changes:
                changed, self._changed = self._changed, set()
                events = self._events
            known = self._known
            try:
                full = not (self._focused() is not None and known is not None and known[0] == self.libvirt.listening != 0)
                if full:
                    vms = self.libvirt.call(self._read_all)
                else:
                    # A reconcile about one VM while events flow: read again only the domains they named.
                    vms = self.libvirt.call(lambda conn: self._reread(conn, known, changed))
            except Exception:
                with self._changes:
                    self._changed |= changed  # not read: still to be read
                raise
            with self._changes:
                if self._events == events:
                    # (else a VM started during this read: the reconcile that event causes must see it,
                    # not this read, which an agent's status report may have begun before it started)
                    self._memo = (time.monotonic(), vms, full)
            return vms

    def _read_all(self, conn) -> list[VM]:
        subscription = self.libvirt.listening  # before listing: events from here on name what changes
        host = conn.getHostname()
        by_uuid, parsed = {}, {}
        for dom in conn.listAllDomains():
            self._read_domain(dom, host, by_uuid, parsed)
        self._parsed = parsed
        self._known = (subscription, host, by_uuid)
        return list(by_uuid.values())

    def _reread(self, conn, known: tuple, uuids) -> list[VM]:
        subscription, host, by_uuid = known
        by_uuid, parsed = dict(by_uuid), dict(self._parsed)  # a list handed out before stays as it was
        for uuid in uuids:
            by_uuid.pop(uuid, None)  # undefined, unless read again just below
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                continue
            self._read_domain(dom, host, by_uuid, parsed)
        self._parsed = parsed
        self._known = (subscription, host, by_uuid)
        return list(by_uuid.values())

    def _read_domain(self, dom, host: str, by_uuid: dict, parsed: dict) -> None:
        """Put the domain as a VM into by_uuid (nothing when it was undefined before it could be read)."""
        try:
            uuid, xml, state = dom.UUIDString(), dom.XMLDesc(), dom.state()[0]
            # Parsing is the cost at thousands of VMs, and the same XML in the same state is the same VM.
            known = self._parsed.get(uuid)
            vm = known[2] if known and known[:2] == (xml, state) and known[2].host == host else vm_of(uuid, dom.name(), state, xml, host)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            return
        parsed[uuid] = (xml, state, vm)
        by_uuid[uuid] = vm

    def focus(self, vm: str | None) -> None:
        """The reconcile this thread is about to run looks at this VM only (None: at everything, read in full)."""
        self._focus.vm = vm

    def _focused(self) -> str | None:
        return getattr(self._focus, "vm", None)

    # plan ------------------------------------------------------------------

    def plan(self, sessions, flows) -> list[Binding]:
        from vtap_drivers.linux.dataplane import unique

        sessions, flows = list(sessions), list(flows)
        vms = self.inventory()
        by_uuid = {vm.uuid: vm for vm in vms}
        by_name: dict[str, list[VM]] = {}
        for vm in vms:
            by_name.setdefault(vm.name, []).append(vm)
        bindings: list[Binding] = []
        self._kernel_kinds = None  # read again for each plan
        for session in sessions:
            members = [f for f in flows if f.session == session.name]
            backend = self._backend(session, members)
            target_device = self._target_device(session, by_uuid)
            if backend == "tc" and target_device is not False:
                bindings.extend(self.tc.session_target(session, target_device)[0])
            for flow in members:
                vm = self._source_vm(flow, by_uuid, by_name)
                if session.target.kind == "vm" and session.target.vm == vm.uuid:
                    raise ValidationError("target", f"{session.target} is the source of flow {flow.name} itself; mirror to another VM")
                for nic in self._source_nics(flow, vm):
                    kind = self._device_kind(nic)
                    if kind == PASSTHROUGH:
                        # Refused whether or not the VM runs: its frames never pass the host, so no flow can show them.
                        raise Unsupported(self.name, "NIC passthrough", f"{no_host_device(nic, vm.name)}: its frames never pass the host (mirror the VM's other NICs with --nic)")
                    if not nic.device or target_device is False:
                        continue  # a VM not running has no device; the follower applies it when it starts
                    if backend == "ovs":
                        bindings.extend(self._ovs_mirror(session, flow, vm, nic.device, target_device))
                    else:
                        bindings.extend(self.tc.plan_vm_device(session, flow, nic.device, vm=vm.uuid, target_device=target_device, macvtap=kind == MACVTAP))
        self._check_mirror_limit(sessions, bindings)
        return unique(bindings)

    def _check_mirror_limit(self, sessions, bindings) -> None:
        """One OVS Mirror per session and bridge: refuse a plan that needs more than a bridge can hold.

        Counted per bridge: mirrors that are not vtap's, vtap's mirrors of sessions this plan does
        not cover (the others, when a change is validated alone), and this plan's sessions there.
        """
        planned: dict[str, set[str]] = {}
        for binding in bindings:
            if binding.key.startswith("ovs/") and binding.flow is not None:
                planned.setdefault(binding.get("bridge"), set()).add(binding.session)
        if not planned:
            return
        names = {s.name for s in sessions}
        use = self.ovs.mirror_use()
        for bridge, mine in sorted(planned.items()):
            foreign, existing = use.get(bridge, (0, set()))
            needed = foreign + len(existing - names) + len(mine)
            if needed > MAX_MIRRORS:
                raise ValidationError(
                    "session",
                    f"Open vSwitch bridge {bridge} would need {needed} mirrors ({foreign} not vtap's), at most {MAX_MIRRORS} are allowed: "
                    f"vtap uses one per session and bridge, so add these flows to an existing session or use --backend tc",
                )

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
            if session.backend != "ovs" and self.tc.ifindex(target.port) is None:  # one look-up, not a dump of every device: plans run per event
                raise NotFound(f"target: interface {target.port} does not exist on this host")
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
        kind = self._device_kind(nics[0])
        if kind == PASSTHROUGH:
            raise ValidationError("target", f"{target}: NIC passthrough: {no_host_device(nics[0], vm.name)}; give the monitoring VM a tap NIC (bridge or network)")
        if kind == MACVTAP:
            # Mirrored to a macvtap's egress, copies leave by its physical NIC onto the wire and the guest gets none.
            raise ValidationError(
                "target", f"{target}: NIC {nics[0].mac} of VM {vm.name} is a macvtap (type='direct'): copies would leave by its physical NIC, not reach the guest; give the monitoring VM a tap NIC (bridge or network)"
            )
        return nics[0].device or False

    def _device_kind(self, nic) -> str:
        """tap, macvtap or passthrough (devices.py); asks the kernel only when libvirt's type leaves it open."""
        kernel_kind = None
        if nic.device and nic.details.get("type") not in ("direct", "bridge", "hostdev", "vdpa"):
            if self._kernel_kinds is None:
                self._kernel_kinds = self.tc.device_kinds()  # e.g. a libvirt network in macvtap mode (forward bridge/vepa/passthrough)
            kernel_kind = self._kernel_kinds.get(nic.device)
        return device_kind(nic, kernel_kind)

    def _backend(self, session: TapSession, flows) -> str:
        backend = session.backend
        if backend is None:
            tc_can = missing_tunnel_device(session.target) is None
            backend = "ovs" if not tc_can and self.ovs.available() else "tc"
        if backend == "ovs":
            if session.target.kind not in OVS_TARGETS:
                raise Unsupported(self.name, f"target {session.target.kind}: with backend ovs", f"ovs targets are {', '.join(sorted(OVS_TARGETS))}")
            if session.sample not in (None, 1):
                raise Unsupported(self.name, "sample with backend ovs", "OVS mirrors copy every packet (use --backend tc)")
            for flow in flows:
                if flow.filter:
                    raise Unsupported(self.name, "filter expressions with backend ovs", "an OVS mirror selects whole ports (use --backend tc)")
        elif backend == "tc":
            missing = missing_tunnel_device(session.target)
            if session.target.kind not in TC_TARGETS or missing:
                raise Unsupported(self.name, f"target {session.target.kind}: with backend tc", f"{missing or 'not a tc target'} (or --backend ovs for NICs on OVS)")
            if session.snaplen is not None and session.target.kind != "pcap":
                raise Unsupported(self.name, "snaplen with backend tc", "tc copies whole frames; snaplen works with pcap targets or --backend ovs")
        else:
            raise Unsupported(self.name, f"backend {backend}", "allowed: tc, ovs")
        return backend

    def _ovs_mirror(self, session: TapSession, flow: TapFlow, vm: VM, device: str, target_device) -> list[Binding]:
        bridge = self.ovs.bridge_of(device)
        if bridge is None:
            raise Unsupported(self.name, "backend ovs for this NIC", f"{device} of VM {vm.name} is not on an Open vSwitch bridge (use --backend tc)")
        out = []
        if session.target.is_tunnel:
            tunnel = tunnel_binding(session.name, bridge, session.target)
            out.append(tunnel)
            output = tunnel.get("port")
        elif self.ovs.bridge_of(target_device) == bridge:
            output = target_device
        else:
            raise ValidationError("target", f"{session.target}: with backend ovs the target must be a port on bridge {bridge}")
        out.append(mirror_binding(session.name, flow.name, vm.uuid, bridge, device, flow.direction.value, output, session.snaplen))
        return out

    # observe / apply / remove ----------------------------------------------

    def observe(self) -> list[Binding]:
        """vtap's objects on this libvirt's guests' devices, and the session targets this store made.

        Another vtap (another libvirtd on this machine, or the linux driver)
        has its own catalog: its filters show up as unknown marks here and are
        left alone, never removed as orphans.
        """
        try:
            devices = {nic.device for vm in self.inventory() for nic in vm.nics if nic.device}
        finally:
            self._memo = None  # observe ends a reconcile (and status): the next one reads afresh
        found = [b for b in self.tc.observe(vm=self._focused()) if b.get("type") in ("vxlan", "capture") or (b.get("type") == "mirror" and b.get("device") in devices)]
        if self.ovs.available():
            # A mirror whose port is gone (its VM stopped: libvirt deleted the port) is stale, whoever made it.
            ports = self.ovs.port_names()
            found.extend(b for b in self.ovs.observe() if b.vm is None or b.get("device") in devices or b.get("device") not in ports)
        return found

    def prepare(self, bindings) -> None:
        tc = _split(bindings)[1]
        if tc:
            self.tc.prepare(tc)  # the tc catalog, written before the store and the kernel change

    def apply(self, bindings) -> None:
        ovs, tc = _split(bindings)
        if tc:
            try:
                self.tc.apply(tc)  # one call: the dataplane reads the kernel and its catalog once
            except OperationFailed as exc:
                gone = sorted({b.get("device") for b in tc if b.get("device") and self.tc.ifindex(b.get("device")) is None})
                if gone:
                    # A guest stopped or lost a NIC since plan() looked: look again.
                    raise TemporaryError(f"{', '.join(gone)} went away while applying: {exc}", delay=0.2) from exc
                raise
        for binding in ovs:
            self.ovs.apply(binding)

    def remove(self, bindings) -> None:
        ovs, tc = _split(bindings)
        for binding in ovs:
            self.ovs.remove(binding)
        if tc:
            self.tc.remove(tc)

    def apply_problems(self) -> list[tuple]:
        return self.tc.apply_failures()

    def watch(self, stop: threading.Event):
        for hint in self.libvirt.watch(stop):
            with self._changes:
                self._events += 1
                self._memo = None  # something changed: the reconcile it causes must read it
                if hint is not None:
                    self._changed.add(hint)
            yield hint

    def close(self) -> None:
        self.libvirt.close()
        self.ovs.close()
        if self._tc is not None:
            self._tc.close()


def _split(bindings) -> tuple[list[Binding], list[Binding]]:
    """(ovs bindings, tc bindings), each in the order given."""
    bindings = list(bindings)
    return [b for b in bindings if b.key.startswith("ovs/")], [b for b in bindings if not b.key.startswith("ovs/")]
