"""The Proxmox VE driver: VMs found through the PVE API, mirrors on this node's tap<vmid>i<n> devices.

Only the node a VM runs on can touch its traffic, so plan() gives bindings only for VMs running on
this node (`node` setting, default the host name); for the others it validates and stays silent, and
that node's agent or hookscript realizes them. The mirror sits on the tap device itself, so it works
the same when firewall=1 puts the tap behind fwbr/fwpr/fwln devices. The data path is the Linux tc
dataplane shared with the kvm and lab drivers.
"""

from __future__ import annotations

import logging
import socket
import time

from vtap_core.driver import Description, Driver, Features
from vtap_core.errors import TemporaryError, Unsupported, ValidationError
from vtap_core.filters import compile_filter

from vtap_drivers.proxmox import desired
from vtap_drivers.proxmox.inventory import Inventory
from vtap_drivers.proxmox.resolve import find_vm, resolve_source, split_reference, target_nic

log = logging.getLogger("vtap.proxmox")

# A CLI command polls the cluster once; plan() is called several times within one command.
POLL_MAX_AGE = 5.0
WATCH_INTERVAL = 10.0


def local_node_name() -> str:
    return socket.gethostname().split(".")[0]


def netns_for(setting, node: str) -> str | None:
    """netns setting: "NAME" for every node, or "node1=ns1,node2=ns2" (tests play nodes as namespaces)."""
    if not setting:
        return None
    text = str(setting).strip()
    if "=" not in text:
        return text
    mapping = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValidationError("netns", f"{text!r}: write NAME or node=NAME,node=NAME")
        mapping[key.strip()] = value.strip()
    if node not in mapping:
        raise ValidationError("netns", f"{text!r} names no namespace for node {node!r}")
    return mapping[node]


class ProxmoxDriver(Driver):
    name = "proxmox"

    def __init__(self, state_dir=None, url=None, user=None, password=None, token_name=None, token_value=None,
                 insecure=False, node=None, cafile=None, netns=None, shared_state=None, datapath=None, **other):
        from vtap_drivers.linux.tcxmirror import check_datapath

        super().__init__(state_dir=state_dir, url=url, user=user, node=node, insecure=insecure)
        self.datapath = check_datapath(datapath)
        self.state_dir = state_dir
        self.node = node or local_node_name()
        self.netns = netns_for(netns, self.node)
        self.shared_state = shared_state if shared_state is not None else desired.default_path()
        self._credentials = dict(url=url, user=user, password=password, token_name=token_name,
                                 token_value=token_value, insecure=bool(insecure), cafile=cafile)
        self._api = None
        self._inventory = None
        self._dataplane = None
        # vmid -> node: what a hookscript knows before the API does (post-start here, pre-stop leaving).
        self.placement_override: dict[int, str | None] = {}

    # ----------------------------------------------------------- plumbing

    @property
    def api(self):
        if self._api is None:
            from vtap_drivers.proxmox.api import PveApi  # requests + proxmoxer: not for a hook that needs no API

            self._api = PveApi(**self._credentials)
        return self._api

    @property
    def cluster(self) -> Inventory:
        if self._inventory is None:
            self._inventory = Inventory(self.api, self.node, state_dir=self.state_dir)
        return self._inventory

    @property
    def dataplane(self):
        if self._dataplane is None:
            from vtap_drivers.linux.dataplane import TcDataplane

            self._dataplane = TcDataplane(netns=self.netns, state_dir=self.state_dir, datapath=self.datapath)
        return self._dataplane

    def refresh(self, force=()) -> set[int]:
        """Poll the cluster now; returns the vmids that appeared, left or changed."""
        return self.cluster.poll(force=set(force))

    def check_node(self) -> None:
        """Refuse a node name the cluster does not have (a typo would leave an agent doing nothing)."""
        names = sorted(str(n.get("node")) for n in self.api.get("nodes"))
        if self.node not in names:
            raise ValidationError("node", f"{self.node!r} is not a node of this cluster (nodes: {', '.join(names)}); set --node or VTAP_PROXMOX_NODE")

    def current_vms(self):
        """The cluster's VMs, polled at most POLL_MAX_AGE seconds ago."""
        if self.cluster.polled_at is None or time.time() - self.cluster.polled_at > POLL_MAX_AGE:
            self.refresh()
        return self.cluster.vms()

    def runs_here(self, vm) -> bool:
        if vm.vmid in self.placement_override:
            return self.placement_override[vm.vmid] == self.node
        return vm.node == self.node and vm.running

    def may_run_here(self, vm) -> bool:
        """Whether plan() looks for the VM's taps here (a tap that exists is then mirrored).

        Placed here whatever its status says (a lagging or "unknown" status must not stop a mirror:
        a stopped VM has no tap anyway), or in a live migration: then both ends have a QEMU and a
        tap, and the destination's is mirrored before the switch-over."""
        if vm.vmid in self.placement_override:
            return self.runs_here(vm)
        return vm.node == self.node or (vm.lock == "migrate" and vm.running)

    # ------------------------------------------------------------ contract

    def describe(self) -> Description:
        return Description(
            name=self.name,
            summary="Proxmox VE: tc mirrors on tap<vmid>i<n> of VMs running on this node; agent and hookscript follow them",
            features=Features(targets=frozenset({"port", "vm", "vxlan", "pcap", "gre", "erspan"}), sources=frozenset({"vm"}),
                              filter=True, sample=True, snaplen_targets=frozenset({"pcap"}),
                              selector_keys=frozenset({"name", "tag", "pool", "host", "network"})),
            connection={"url": self._credentials["url"], "user": self._credentials["user"], "node": self.node,
                        "insecure": self._credentials["insecure"], "netns": self.netns},
        )

    def inventory(self):
        return [vm.to_model() for vm in self.current_vms()]

    def plan(self, sessions, flows):
        vms = self.current_vms()
        sessions = list(sessions)
        flows = list(flows)
        if self.shared_state:  # refuse now what pmxcfs would refuse when the change is published
            desired.check_size(desired.document_text(sessions, flows, self.node, self._resolution(vms, sessions, flows)), self.shared_state)
        for session in sessions:
            self.check_features(session, [f for f in flows if f.session == session.name])
        present = None
        bindings = []
        for session in sessions:
            members = [f for f in flows if f.session == session.name]
            sources = []  # (flow, vm, nic, device) realizable on this node
            for flow in members:
                vm, nics = self._resolve(vms, flow.source)
                if not self.may_run_here(vm):
                    # Another node realizes it: refuse here and now what would fail there.
                    compile_filter(flow.filter)
                    continue
                if present is None:
                    present = self.dataplane.devices()
                for nic in nics:
                    device = vm.device(nic)
                    if device in present:
                        sources.append((flow, vm, nic, device))
                    else:
                        log.debug("VM %s runs here but %s is missing: not mirrored now", vm.vmid, device)
            target = self._target_device(session, vms, bool(sources))
            if not sources and session.target.kind in ("vxlan", "pcap"):
                self.dataplane.session_target(session)  # a tunnel host that does not resolve, a bad path
            if sources:
                bindings.extend(self._bindings(session, sources, target))
        return bindings

    def observe(self):
        return self.dataplane.observe()

    def apply(self, bindings):
        self.dataplane.apply(bindings)

    def remove(self, bindings):
        self.dataplane.remove(bindings)

    def apply_problems(self) -> list[tuple]:
        return self.dataplane.apply_failures()

    def watch(self, stop):
        """Hints for `vtap follow` (the agent polls by itself): VMs that changed since the last poll."""
        while not stop.wait(WATCH_INTERVAL):
            try:
                changed = self.refresh()
            except TemporaryError as exc:
                log.debug("poll failed, trying again: %s", exc)
                continue
            for vmid in sorted(changed):
                vm = self.cluster.vm(vmid)
                yield vm.identity if vm is not None else None  # gone: look at everything

    def close(self):
        if self._dataplane is not None and hasattr(self._dataplane, "close"):
            self._dataplane.close()

    # ------------------------------------------------------------ helpers

    def _resolve(self, vms, source):
        """resolve_source, reading the VM's config again before saying a NIC is not there.

        A NIC added by a synchronous config change leaves no trace in the lists a poll reads.
        """
        try:
            return resolve_source(vms, source)
        except ValidationError as exc:
            if exc.field != "nic":
                raise
            vm = find_vm(vms, split_reference(source.vm)[0])
        self.refresh(force={vm.vmid})
        return resolve_source(self.cluster.vms(), source)

    def _target_device(self, session, vms, needed: bool):
        """The local device a vm: target means (the monitoring VM's tap, on this node)."""
        target = session.target
        from vtap_drivers.linux.dataplane import missing_tunnel_device

        missing = missing_tunnel_device(target)
        if missing:
            raise Unsupported(self.name, f"target {target.kind}:", missing)
        if target.kind != "vm":
            return None
        monitor = find_vm(vms, target.vm)
        nic = target_nic(monitor, target.mac)
        if needed and not self.runs_here(monitor):
            raise Unsupported(self.name, "a vm: target on another node",
                              f"monitoring VM {monitor.vmid} runs on {monitor.node}, sources here on {self.node}; use a vxlan:// target")
        return monitor.device(nic)

    def _bindings(self, session, sources, target_device):
        out = []
        for flow, vm, nic, device in sources:
            out.extend(self.dataplane.plan_vm_device(session, flow, device, vm=vm.identity, target_device=target_device))
        return out

    # ------------------------------------------------------ node placement

    def placement(self, flows) -> str:
        """Whether flows were applied here or only recorded (for the command's message)."""
        vms = self.current_vms()
        here, elsewhere = [], []
        for flow in flows:
            try:
                vm, _ = resolve_source(vms, flow.source)
            except Exception:  # noqa: BLE001 - validation has already reported it
                continue
            (here if self.runs_here(vm) else elsewhere).append(vm)
        parts = []
        if here:
            parts.append(f"applied on this node ({self.node}) for VM {', '.join(str(v.vmid) for v in here)}")
        for vm in elsewhere:
            where = f"runs on node {vm.node}" if vm.running else f"is {vm.status} (last on node {vm.node})"
            parts.append(f"recorded only for VM {vm.vmid}: it {where}; that node's agent or hookscript applies it")
        return "; ".join(parts)

    def publish_desired(self, sessions, flows) -> None:
        """Share the store's new desired state with every node (see desired.py)."""
        if self.shared_state:
            desired.publish(self.shared_state, sessions, flows, self.node, self._resolution(self.current_vms(), sessions, flows))

    def _resolution(self, vms, sessions, flows) -> dict:
        from vtap_drivers.proxmox.hook_plan import resolution

        return resolution(vms, sessions, flows, resolve_source)
