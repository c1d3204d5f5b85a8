"""The Linux tc dataplane: kernel-side filtered mirrors on devices of one network namespace.

Every Linux-host driver (linux, lab, kvm, proxmox) ends up here with resolved
device names. What it puts in the kernel, per mirrored device and hook:

    clsact qdisc on DEVICE
      -> bpf classifier (classic BPF from the pcap filter expression, sampling prepended)
      -> mirred egress mirror to TARGET DEVICE, verdict "continue",
         cookie = vtap's 16-byte mark (so other filters on the hook still run,
         and observe() finds vtap's filters and nothing else)

Target devices vtap owns (alias "vtap:<mark>"): a VXLAN device per session and
tunnel (vtapx<hash>), an ifb sink per pcap session (vtapc<hash>) read by the
capture process (capture.py). A port or vm target is a device that exists.

API (all names are device names in this namespace):

    dp = TcDataplane(netns=None, state_dir=DIR)     # netns: a named namespace (must exist)

    # planning: pure, nothing changes; ValidationError for bad filters/targets
    dp.plan_interface(session, flow, device=None)            -> [Binding]  host interface semantics
    dp.plan_vm_device(session, flow, device, vm=None,
                      target_device=None)                    -> [Binding]  VM's host-side device
        session: TapSession, flow: TapFlow. device defaults to flow.source.interface.
        target_device: the device for a port:/vm: target (default: the port: name).
        The session's target binding (vxlan device, pcap sink) comes first in every
        result; it is equal each time, so unique(list) of several results is safe.
    dp.mirror(session, flow, device, hook, to_device, filter=None, sample=None, vm=None, guard=None)
    dp.session_target(session, target_device=None) -> ([Binding], device to mirror to, guard or None)
    dp.vxlan_target(session, remote, port, vni)  -> (Binding, device name, guard expression)
    dp.capture_target(session, path, snaplen)     -> (Binding, device name)
    hooks_for(direction, vm_port=False)           -> ("ingress",) / ("egress",) / both
        host interface: in = ingress, out = egress (as tcpdump -Q);
        a VM's host-side device (tap/vnet/veth host end) is the reverse: the VM's
        out (sent by the VM) is what the device receives = ingress.

    # kernel
    dp.observe()          -> [Binding] found by vtap's marks (with Counters), orphans included
    dp.apply(bindings)    idempotent; one filter per binding; rolls back its own additions on failure
    dp.remove(bindings)   deleting what is gone is fine; drops a clsact vtap added once it is empty
    dp.devices()          -> set of device names in the namespace
    dp.ifindex(name)      -> int or None
    dp.close()

Binding keys: "tc/[NETNS/]DEVICE/HOOK/SESSION/FLOW", "vxlan/[NETNS/]DEVICE",
"pcap/[NETNS/]DEVICE". The mark in the kernel is a digest of key+spec; the
catalog (catalog.py, in state_dir) maps it back, so observe() returns exactly
what plan returned, and a changed spec is a new mark (remove + apply).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import socket
import threading
import time
from dataclasses import replace
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_GETACTION,
    RTM_GETLINK,
    RTM_GETTFILTER,
    RTM_NEWACTION,
    RTM_NEWLINK,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
)

from vtap_core.driver import Binding, Counters
from vtap_core.errors import NotFound, OperationFailed, ValidationError
from vtap_core.filters import compile_filter, with_sampling
from vtap_core.model import Direction, TapFlow, TapSession
from vtap_drivers.linux import tcnl
from vtap_drivers.linux.catalog import MARK_MAGIC, Catalog, alias_of, mark_from_alias, mark_of

HOOKS = ("ingress", "egress")
ETH_HLEN = 14


class TcFilter(NamedTuple):
    prio: int
    handle: int
    mark: bytes | None  # None: not vtap's
    to_index: int
    packets: int
    bytes: int

# vtap's filters share one priority, low so they see packets before most others'
# (their verdict is "continue", so the others still run afterwards).
FILTER_PRIO = 7
VXLAN_PREFIX = "vtapx"
SINK_PREFIX = "vtapc"
IFF_UP = 1
RELEASE_TIMEOUT = 2.0  # seconds; an RCU grace period is usually a few milliseconds
REQUEST = NLM_F_REQUEST | NLM_F_ACK
CREATE = REQUEST | NLM_F_CREATE | NLM_F_EXCL
DUMP = NLM_F_REQUEST | NLM_F_DUMP


def hooks_for(direction, vm_port: bool = False) -> tuple[str, ...]:
    """The tc hooks that see a direction (see the module docstring)."""
    direction = Direction.parse(direction)
    received, sent = ("egress", "ingress") if vm_port else ("ingress", "egress")
    hooks = []
    if direction.includes(Direction.IN):
        hooks.append(received)
    if direction.includes(Direction.OUT):
        hooks.append(sent)
    return tuple(hooks)


def unique(bindings) -> list[Binding]:
    """Bindings without repeats (by key, first one kept), order kept."""
    seen, out = set(), []
    for binding in bindings:
        if binding.key not in seen:
            seen.add(binding.key)
            out.append(binding)
    return out


def resolve_host(host: str) -> str:
    """An IP address for a tunnel's remote end (names resolved once, at plan time)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0]
    except OSError as exc:
        raise ValidationError("target", f"cannot resolve {host!r}: {exc.strerror or exc}") from None


def _short_hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:10]


def program_for(binding: Binding):
    """Classic BPF ops for a mirror binding: filter, minus the tunnel's own packets, sampled."""
    expression = binding.get("filter") or ""
    guard = binding.get("guard") or ""
    if guard:
        expression = f"({expression}) and not ({guard})" if expression else f"not ({guard})"
    return with_sampling(compile_filter(expression), binding.get("sample"))


class TcDataplane:
    """Mirrors in one network namespace through one netlink socket (see module docstring)."""

    def __init__(self, netns: str | None = None, state_dir: str = "."):
        self.netns = netns
        self.state_dir = os.path.abspath(state_dir)
        self.catalog = Catalog(self.state_dir, netns)
        self._ns_key = f"{netns}/" if netns else ""
        self._ipr = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------ planning

    def mirror(self, session: str, flow: str, device: str, hook: str, to_device: str, filter: str | None = None, sample: int | None = None, vm: str | None = None, guard: str | None = None) -> Binding:
        if hook not in HOOKS:
            raise ValidationError("hook", f"{hook!r} is not ingress or egress")
        compile_filter(filter)  # refuse a bad expression now, with libpcap's message
        spec = (
            ("type", "mirror"),
            ("device", device),
            ("hook", hook),
            ("to", to_device),
            ("filter", filter or ""),
            ("sample", sample or 1),
            ("guard", guard or ""),
        )
        return Binding(key=f"tc/{self._ns_key}{device}/{hook}/{session}/{flow}", session=session, flow=flow, vm=vm, spec=spec, order=1)

    def vxlan_target(self, session: str, remote: str, port: int, vni: int) -> tuple[Binding, str, str]:
        remote = resolve_host(remote)
        device = VXLAN_PREFIX + _short_hash(self.netns, session, remote, port, vni)
        spec = (("type", "vxlan"), ("device", device), ("remote", remote), ("port", int(port)), ("vni", int(vni)))
        binding = Binding(key=f"vxlan/{self._ns_key}{device}", session=session, spec=spec, order=0)
        # The tunnel's own packets may leave through a mirrored device: never copy them again.
        guard = f"udp dst port {int(port)} and dst host {remote}"
        return binding, device, guard

    def capture_target(self, session: str, path: str, snaplen: int | None) -> tuple[Binding, str]:
        from vtap_drivers.linux.capture import check_capture_path

        path = check_capture_path(path)
        device = SINK_PREFIX + _short_hash(self.netns, session)
        spec = (("type", "capture"), ("device", device), ("path", path), ("snaplen", snaplen))
        return Binding(key=f"pcap/{self._ns_key}{device}", session=session, spec=spec, order=0), device

    def plan_interface(self, session: TapSession, flow: TapFlow, device: str | None = None) -> list[Binding]:
        return self._plan(session, flow, device or flow.source.interface, vm_port=False, vm=None, target_device=None)

    def plan_vm_device(self, session: TapSession, flow: TapFlow, device: str, vm: str | None = None, target_device: str | None = None) -> list[Binding]:
        return self._plan(session, flow, device, vm_port=True, vm=vm, target_device=target_device)

    def session_target(self, session: TapSession, target_device: str | None = None) -> tuple[list[Binding], str, str | None]:
        """(bindings vtap owns for the target, device to mirror to, guard expression or None)."""
        target = session.target
        if target.kind == "vxlan":
            binding, device, guard = self.vxlan_target(session.name, target.host, target.udp_port, target.vni)
            return [binding], device, guard
        if target.kind == "pcap":
            binding, device = self.capture_target(session.name, target.path, session.snaplen)
            return [binding], device, None
        if target.kind in ("port", "vm"):
            device = target_device or target.port
            if not device:
                raise ValidationError("target", f"{target}: no local device for it")
            return [], device, None
        raise ValidationError("target", f"{target}: the tc dataplane has no {target.kind} devices in this kernel")

    def _plan(self, session, flow, device, vm_port, vm, target_device):
        out, to_device, guard = self.session_target(session, target_device)
        if to_device == device:
            raise ValidationError("target", f"{session.target} is the mirrored device {device} itself")
        for hook in hooks_for(flow.direction, vm_port=vm_port):
            out.append(self.mirror(session.name, flow.name, device, hook, to_device, flow.filter, session.sample, vm=vm, guard=guard))
        return out

    # ------------------------------------------------------------ netlink plumbing

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            try:
                # flags=0: use the namespace, never create it
                ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
            except FileNotFoundError:
                raise NotFound(f"netns {self.netns}: no such network namespace") from None
            ipr.asyncore.status["nlm_generator"] = False  # pyroute2 0.9's IPRoute leaves this unset
            ipr.register_policy({
                RTM_NEWTFILTER: tcnl.filtermsg,
                RTM_NEWACTION: tcnl.actionmsg,
                RTM_GETACTION: tcnl.actionmsg,
                RTM_NEWLINK: tcnl.linkmsg,
            })
            self._ipr = ipr
        return self._ipr

    def _request(self, msg, msg_type, flags=REQUEST):
        return self.ipr.nlm_request(msg, msg_type, flags)

    def close(self) -> None:
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    def _link(self, name: str | None = None, index: int = 0):
        try:
            found = self._request(tcnl.link_query(name=name, index=index), RTM_GETLINK, REQUEST)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return None
            raise
        return next((m for m in found if m.get("index")), None)

    def ifindex(self, name: str) -> int | None:
        with self._lock:
            link = self._link(name=name)
            return link["index"] if link is not None else None

    def devices(self) -> set[str]:
        with self._lock:
            return {m.get_attr("IFLA_IFNAME") for m in self._request(tcnl.link_query(), RTM_GETLINK, DUMP)}

    def _links_of_kind(self, kind: str):
        return [m for m in self._request(tcnl.link_query(kind=kind), RTM_GETLINK, DUMP) if m.kind() == kind]

    def _mirred_marks(self) -> set[bytes]:
        """Marks of every vtap mirred action in the namespace (one dump; finds uncatalogued orphans).

        A deleted filter's action stays listed until the kernel releases it
        (after an RCU grace period), so this says "maybe there", never "there".
        """
        found = set()
        for msg in self._request(tcnl.mirred_dump_request(), RTM_GETACTION, DUMP):
            table = msg.get_attr("TCA_ROOT_TAB")
            for _, act in table["attrs"] if table is not None else ():
                state = tcnl.mirred_state(act)
                if state is not None and state[0].startswith(MARK_MAGIC):
                    found.add(state[0])
        return found

    def _filters(self, ifindex: int, hook: str) -> list[TcFilter]:
        """Every filter on a device's hook (vtap's have a mark). One dump."""
        out = []
        try:
            messages = self._request(tcnl.filter_query(ifindex, hook), RTM_GETTFILTER, DUMP)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return []  # no clsact (or no device): no filters
            raise
        for msg in messages:
            if not msg["handle"]:
                continue  # the per-priority header entry, not a filter
            state = tcnl.mirror_of(msg)
            if state and state[0].startswith(MARK_MAGIC):
                mark, to_index, packets, nbytes = state
                out.append(TcFilter(msg["info"] >> 16, msg["handle"], mark, to_index, packets, nbytes))
            else:
                out.append(TcFilter(msg["info"] >> 16, msg["handle"], None, 0, 0, 0))
        return out

    # ------------------------------------------------------------ observe

    def observe(self) -> list[Binding]:
        """What vtap has in this namespace: one filter dump per (device, hook) vtap used, one action dump."""
        with self._lock:
            catalog = self.catalog.load()
            names: dict[int, str | None] = {}

            def name_of(index):
                if index not in names:
                    link = self._link(index=index) if index else None
                    names[index] = link.get_attr("IFLA_IFNAME") if link is not None else None
                return names[index]

            hooks: dict[tuple[int, str], dict[bytes, Binding]] = {}
            for mark, binding, ifindex in catalog.entries():
                if binding.get("type") == "mirror" and ifindex:
                    hooks.setdefault((ifindex, binding.get("hook")), {})[mark] = binding
            out = []
            for (ifindex, hook), wanted in hooks.items():
                for found in self._filters(ifindex, hook):
                    binding = wanted.get(found.mark)
                    if binding is None:
                        continue
                    # The target device may have gone or been recreated: then the spec shows it.
                    actual = name_of(found.to_index) or ""
                    if actual != binding.get("to"):
                        binding = _drifted(binding, found.mark, to=actual)
                    # At ingress the kernel counts from the network header; count whole frames.
                    nbytes = found.bytes + (ETH_HLEN * found.packets if hook == "ingress" else 0)
                    out.append(replace(binding, counters=Counters(found.packets, nbytes)))
            known = catalog.marks()
            out.extend(self._unknown(mark) for mark in self._mirred_marks() if mark not in known)
            out.extend(self._observe_devices(catalog))
            return out

    def _observe_devices(self, catalog) -> list[Binding]:
        from vtap_drivers.linux.capture import running_captures

        out = []
        captures = None
        for kind in ("vxlan", "ifb"):
            for link in self._links_of_kind(kind):
                mark = mark_from_alias(link.get_attr("IFLA_IFALIAS"))
                if mark is None:
                    continue
                binding = catalog.binding(mark)
                if binding is None:
                    out.append(self._unknown(mark, link.get_attr("IFLA_IFNAME")))
                    continue
                if not link["flags"] & IFF_UP:
                    continue  # not working: apply brings it up
                if kind == "vxlan":
                    data = link.vxlan_data()
                    actual = {
                        "remote": data.get_attr("IFLA_VXLAN_GROUP") or data.get_attr("IFLA_VXLAN_GROUP6"),
                        "port": data.get_attr("IFLA_VXLAN_PORT"),
                        "vni": data.get_attr("IFLA_VXLAN_ID"),
                    }
                else:
                    if captures is None:
                        captures = running_captures(self.state_dir)
                    process = captures.get(binding.get("device"))
                    if process is None:
                        continue  # the sink without its capture process: apply starts it
                    actual = {"path": process["path"], "snaplen": process["snaplen"]}
                if any(binding.get(name) != value for name, value in actual.items()):
                    binding = _drifted(binding, mark, **actual)
                out.append(binding)
        return out

    def _unknown(self, mark: bytes, device: str | None = None) -> Binding:
        """Something vtap marked but no catalog names (the state dir was lost): an orphan."""
        spec = (("type", "unknown"), ("mark", mark.hex()), ("device", device))
        return Binding(key=f"unknown/{self._ns_key}{mark.hex()}", session="?", spec=spec, order=1 if device is None else 0)

    # ------------------------------------------------------------ apply

    def apply(self, bindings) -> None:
        bindings = sorted(unique(bindings), key=lambda b: b.order)
        for binding in bindings:
            if binding.get("type") not in ("mirror", "vxlan", "capture"):
                raise OperationFailed(f"{binding.key}: the tc dataplane cannot apply a {binding.get('type')!r} binding")
        with self._lock, self.catalog.locked() as catalog:
            done = []
            try:
                targets = [b for b in bindings if b.get("type") != "mirror"]
                for binding in targets:
                    catalog.remember(binding)
                catalog.save()  # before the kernel: a crash leaves nothing unnamed
                for binding in targets:
                    if binding.get("type") == "vxlan":
                        self._ensure_vxlan(binding, done)
                    else:
                        self._ensure_capture(binding, done)
                self._apply_mirrors([b for b in bindings if b.get("type") == "mirror"], catalog, done)
            except Exception:
                self._remove(list(reversed(done)), catalog)
                catalog.save()
                raise
            catalog.save()

    def _apply_mirrors(self, bindings: list[Binding], catalog: Catalog, done: list) -> None:
        indexes: dict[str, int] = {}
        for binding in bindings:
            ifindex = self._resolve(binding.get("device"), indexes, "interface")
            self._resolve(binding.get("to"), indexes, "target device")
            catalog.remember(binding, ifindex)
        catalog.save()  # before the kernel: a crash leaves nothing unnamed
        by_device: dict[str, list[Binding]] = {}
        for binding in bindings:
            by_device.setdefault(binding.get("device"), []).append(binding)
        for device, group in by_device.items():
            ifindex = indexes[device]
            fresh = self._ensure_clsact(ifindex, device, catalog)
            for hook in HOOKS:
                wanted = [b for b in group if b.get("hook") == hook]
                present = set() if fresh or not wanted else {f.mark for f in self._filters(ifindex, hook)}
                for binding in wanted:
                    mark = mark_of(binding)
                    if mark in present:
                        continue
                    self._add_filter(binding, ifindex, indexes[binding.get("to")], mark)
                    present.add(mark)
                    done.append(binding)

    def _resolve(self, name: str, indexes: dict, what: str) -> int:
        if name not in indexes:
            indexes[name] = self.ifindex(name)
        if indexes[name] is None:
            where = f" in netns {self.netns}" if self.netns else ""
            raise OperationFailed(f"{what} {name} does not exist{where}")
        return indexes[name]

    def _add_filter(self, binding: Binding, ifindex: int, to_index: int, mark: bytes) -> None:
        msg = tcnl.mirror_filter_request(ifindex, binding.get("hook"), FILTER_PRIO, program_for(binding), to_index, mark)
        try:
            self._request(msg, RTM_NEWTFILTER, CREATE)
        except NetlinkError as exc:
            raise OperationFailed(f"{binding.key}: the kernel refused the filter: {os.strerror(exc.code)}") from None

    def _ensure_clsact(self, ifindex: int, device: str, catalog: Catalog) -> bool:
        """True when vtap added the clsact just now (so it holds no filters yet)."""
        msg = tcnl.qdisc_request(ifindex)
        try:
            self._request(msg, RTM_NEWQDISC, CREATE)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False  # someone's (or ours from before): use it as it is
            raise OperationFailed(f"interface {device}: cannot add a clsact qdisc: {os.strerror(exc.code)}") from None
        catalog.qdiscs[device] = ifindex
        return True

    def _ensure_device(self, binding: Binding, kind: str, create, done: list) -> None:
        """A vtap-owned device with this binding's mark, up; replaced when its mark differs."""
        name = binding.get("device")
        alias = alias_of(binding)
        link = self._link(name=name)
        if link is not None:
            if link.get_attr("IFLA_IFALIAS") == alias and link.kind() == kind:
                if not link["flags"] & IFF_UP:
                    self.ipr.link("set", index=link["index"], state="up")
                return
            if mark_from_alias(link.get_attr("IFLA_IFALIAS")) is None:
                raise OperationFailed(f"device {name} exists and is not vtap's; remove it or rename it")
            self.ipr.link("del", index=link["index"])  # an older spec of ours
        try:
            create(name)
        except NetlinkError as exc:
            if binding.get("type") == "vxlan" and exc.code == errno.EEXIST:
                raise OperationFailed(
                    f"vxlan target vni {binding.get('vni')} port {binding.get('port')}: another VXLAN device here already uses that VNI and port"
                ) from None
            raise OperationFailed(f"cannot create {kind} device {name}: {os.strerror(exc.code)}") from None
        done.append(binding)
        # No IPv6 address on it, or it sends router solicitations of its own into the pcap file or tunnel.
        self.ipr.link("set", ifname=name, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]})
        self.ipr.link("set", ifname=name, ifalias=alias, state="up")

    def _ensure_vxlan(self, binding: Binding, done: list) -> None:
        remote = binding.get("remote")
        group = "vxlan_group6" if ":" in remote else "vxlan_group"

        def create(name):
            self.ipr.link("add", ifname=name, kind="vxlan", vxlan_id=binding.get("vni"), vxlan_port=binding.get("port"), vxlan_learning=0, **{group: remote})

        self._ensure_device(binding, "vxlan", create, done)

    def _ensure_capture(self, binding: Binding, done: list) -> None:
        from vtap_drivers.linux.capture import start_capture_process

        self._ensure_device(binding, "ifb", lambda name: self.ipr.link("add", ifname=name, kind="ifb"), done)
        device = binding.get("device")
        start_capture_process(device, device, binding.get("path"), binding.get("snaplen"), self.netns, self.state_dir)

    # ------------------------------------------------------------ remove

    def remove(self, bindings) -> None:
        bindings = sorted(unique(bindings), key=lambda b: -b.order)
        with self._lock, self.catalog.locked() as catalog:
            self._remove(bindings, catalog)
            catalog.save()

    def _wait_released(self, marks: set) -> None:
        """Wait until the kernel has let go of deleted filters' actions.

        cls_bpf frees a deleted filter's actions after an RCU grace period, and
        until then the action dump still lists them: observe() or apply() right
        after a remove would take a deleted mirror for a present one.
        """
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while marks & self._mirred_marks() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _remove(self, bindings, catalog: Catalog) -> None:
        mirrors: dict[str, list[Binding]] = {}
        for binding in bindings:
            kind = binding.get("type")
            if kind == "mirror":
                mirrors.setdefault(binding.get("device"), []).append(binding)
            elif kind == "unknown" and binding.get("device") is None:
                self._remove_unknown_filter(bytes.fromhex(binding.get("mark")), catalog)
        for device, group in mirrors.items():
            self._remove_mirrors(device, group, catalog)
        if mirrors:
            self._wait_released({real_mark(b) for group in mirrors.values() for b in group})
        for binding in bindings:
            kind = binding.get("type")
            if kind in ("vxlan", "capture") or (kind == "unknown" and binding.get("device")):
                self._remove_device(binding)
            if kind != "unknown":
                catalog.forget(real_mark(binding))

    def _remove_mirrors(self, device: str, group: list[Binding], catalog: Catalog) -> None:
        ifindex = self.ifindex(device)
        if ifindex is None:
            catalog.qdiscs.pop(device, None)
            return  # the device is gone, and its filters with it
        for hook in {b.get("hook") for b in group}:
            wanted = {real_mark(b) for b in group if b.get("hook") == hook}
            self._delete_filters(ifindex, hook, wanted)
        self._drop_clsact_if_unused(ifindex, device, catalog)

    def _delete_filters(self, ifindex: int, hook: str, marks: set) -> bool:
        found = False
        for prio, handle, mark, *_ in self._filters(ifindex, hook):
            if mark in marks:
                found = True
                try:
                    self._request(tcnl.filter_query(ifindex, hook, prio, handle), RTM_DELTFILTER, REQUEST)
                except NetlinkError as exc:
                    if exc.code not in (errno.ENOENT, errno.EINVAL):
                        raise OperationFailed(f"cannot delete a vtap filter on ifindex {ifindex}: {os.strerror(exc.code)}") from None
        return found

    def _drop_clsact_if_unused(self, ifindex: int, device: str, catalog: Catalog) -> None:
        """Remove the clsact vtap added on this device once nothing (of anyone's) is left on it."""
        if catalog.qdiscs.get(device) != ifindex:
            catalog.qdiscs.pop(device, None)  # not ours, or made on a device of the same name that is gone
            return
        if any(self._filters(ifindex, hook) for hook in HOOKS):
            return
        try:
            self._request(tcnl.qdisc_request(ifindex), RTM_DELQDISC, REQUEST)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise
        catalog.qdiscs.pop(device, None)

    def _remove_unknown_filter(self, mark: bytes, catalog: Catalog) -> None:
        """Find an uncatalogued mark: look at every device's hooks (rare, slow path)."""
        for link in self._request(tcnl.link_query(), RTM_GETLINK, DUMP):
            for hook in HOOKS:
                if self._delete_filters(link["index"], hook, {mark}):
                    self._drop_clsact_if_unused(link["index"], link.get_attr("IFLA_IFNAME"), catalog)

    def _remove_device(self, binding: Binding) -> None:
        name = binding.get("device")
        wanted = real_mark(binding).hex()
        if binding.get("type") == "capture" or name.startswith(SINK_PREFIX):
            from vtap_drivers.linux.capture import stop_capture_process

            stop_capture_process(name, self.state_dir)
        link = self._link(name=name)
        if link is None:
            return
        mark = mark_from_alias(link.get_attr("IFLA_IFALIAS"))
        if mark is None or mark.hex() != wanted:
            return  # someone else's, or a newer spec of ours
        try:
            self.ipr.link("del", index=link["index"])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def _drifted(binding: Binding, mark: bytes, **actual) -> Binding:
    """The binding as the kernel really holds it: some spec values differ, and the mark it carries."""
    spec = tuple((name, actual.get(name, value)) for name, value in binding.spec) + (("mark", mark.hex()),)
    return replace(binding, spec=spec)


def real_mark(binding: Binding) -> bytes:
    """The mark a binding has in the kernel: its own digest, or the one observe() found on it."""
    found = binding.get("mark")
    return bytes.fromhex(found) if found else mark_of(binding)
