"""The Linux tc dataplane: kernel-side filtered mirrors on devices of one network namespace.

Every Linux-host driver (linux, lab, kvm, proxmox) ends up here with resolved
device names. What it puts in the kernel, per mirrored device and hook:

    clsact qdisc on DEVICE (added if missing; removed with vtap's last filter,
                            only if vtap added it and nobody else's filter is on it)
      -> bpf classifier, priority 7, or the nearest one no other filter on that hook
         holds (classic BPF from the pcap filter expression, the 1-in-N sampling
         test prepended, the tunnel's own packets excluded)
      -> mirred egress mirror to TARGET DEVICE, verdict "continue" (other
         filters on the hook still run), cookie = the mark: "vt", 2 bytes naming
         the state dir (two stores never take each other's for orphans), 12 bytes
         of digest of the binding's key and spec

With datapath="tcx" (TcDataplane(..., datapath="tcx")), a mirror the tcx hook can carry is instead
one eBPF program on the device's tcx hook, pinned in bpffs; its spec says ("datapath", "tcx"), and
tcxmirror.py does the kernel side (apply, observe from the pins, remove). The tcx hook runs before
any qdisc, so someone else's ingress/root qdiscs (placement() below) matter only to a mirror that
falls back to cls_bpf. A tcx mirror to a pcap sink (spec ("sink", "ring")) clones nothing: it writes
each frame into the sink's BPF ring buffer (bpfring.py), pinned beside the mirrors when the sink is
applied and read by the capture process with the sink's AF_PACKET ring. The rest stays as below.
On datapath=tc a mirror to such a sink is a direct-action cls_bpf filter running that same ring
writer, named "vtap:<mark hex>" instead of a cookie (ringfilter.py); same place, prio and handle.

Someone else's `ingress` qdisc (Proxmox rate=, libvirt <bandwidth>) sits where
clsact would and answers for both clsact parents: the ingress hook uses it, an
egress filter goes on the device's htb/hfsc/prio root qdisc ("parent" in the
binding's spec), and with no such root the flow is refused at plan time naming
device and qdisc (placement()); a hook shared as a block with other devices is
refused too. observe() reports a filter an ingress qdisc took onto its ingress
block, and one on a device that now has another name, as drift.

Target devices vtap owns carry the alias "vtap:<mark>" and no IPv6 address: a
VXLAN device per session (vtapx<hash>; the kernel allows one per VNI and UDP
port in a namespace), a gretap/ip6gretap/erspan/ip6erspan device per GRE or
ERSPAN session (vtapg<hash>; netlink bodies in grenl.py), an ifb sink per pcap
session (vtapc<hash>) read by the capture process of capture.py. A port: or
vm: target is a device that exists.

API (all names are device names in this namespace):

    dp = TcDataplane(netns=None, state_dir=DIR)     # netns: a named namespace (must exist)

    # planning: pure, nothing changes; ValidationError for bad filters/targets
    dp.plan_interface(session, flow, device=None)            -> [Binding]  host interface semantics
    dp.plan_vm_device(session, flow, device, vm=None,
                      target_device=None, macvtap=False)     -> [Binding]  a VM's host-side device
        macvtap=True: the device is a macvtap, whose egress carries what the VM sends.
        session: TapSession, flow: TapFlow; device defaults to flow.source.interface.
        target_device: the device for a port:/vm: target (default: the port: name).
        The session's target binding (vxlan device, pcap sink) comes first in every
        result and is equal each time: pass several results through unique().
    dp.session_target(session, target_device=None) -> ([Binding], device to mirror to, guard or None)
        what a session needs even with no flow (reconcile plans a session alone)
    dp.mirror(session, flow, device, hook, to_device, filter=None, sample=None, vm=None, guard=None)
    dp.vxlan_target(session, remote, port, vni, local=None)  -> (Binding, device name, guard expression)
    dp.gre_target(session, "gre"|"erspan", remote, key, version=None, local=None) -> (Binding, device, guard)
    missing_tunnel_device(target)                 -> why this kernel cannot make a gre/erspan device, or None
    dp.capture_target(session, path, snaplen, max_size=None, max_files=None) -> (Binding, device name)
    hooks_for(direction, vm_port=False)           -> ("ingress",) / ("egress",) / both
        host interface: in = ingress, out = egress (as tcpdump -Q);
        a VM's host-side device (tap/vnet/veth host end) is the reverse: the VM's
        out (sent by the VM) is what the device receives = ingress.
    unique(bindings)                              -> bindings without repeated keys

    # kernel (one netlink socket; safe to share between threads)
    dp.observe()          -> [Binding] found by vtap's marks, with Counters (packets, frame bytes,
                             copies the target refused, the target's health: targethealth.py);
                             drifted ones (target device recreated, device renamed, filter on
                             another hook than planned, vxlan changed) differ in spec;
                             orphans without a catalog entry come as "unknown/[NETNS/]MARK" keys,
                             a clsact vtap added that holds no filter any more as "clsact/[NETNS/]DEVICE"
    with dp.one_look():   plans and observe() inside read the links and qdiscs once (this thread's)
    dp.prepare(bindings)  names them in the catalog now (the one file apply writes): a full disk
                          fails here, before anything in the kernel changed
    dp.apply(bindings)    idempotent; one filter per binding; rolls back its own additions on failure
    dp.remove(bindings)   deleting what is gone is fine
    dp.devices()          -> set of device names in the namespace
    dp.device_kinds()     -> {device name: IFLA_INFO_KIND or None}
    dp.ifindex(name)      -> int or None
    dp.close()

Binding keys: "tc/[NETNS/]DEVICE/HOOK/SESSION/FLOW", "vxlan/[NETNS/]DEVICE", "gre/..." and "erspan/...",
"pcap/[NETNS/]DEVICE" (NETNS/ only when netns is set). The mark in the kernel
is a digest of key+spec; the catalog (catalog.py, in state_dir) maps it back,
so observe() returns exactly what plan returned, and a changed spec is a new
mark (remove + apply). A filter is added with a handle named by its mark
(tcnl.handle_for), so observe() gets each of vtap's filters by handle, a
window of gets per send, down to the mark only (which mirrors are in place: a
deleted filter's action outlives it until the kernel releases it); a hook
where a get does not show the mark is dumped whole. Then one dump of mirred
actions (counters and targets of those, and orphans the catalog lost).
A plan of a few devices gets them one by one; of many, one link and one qdisc dump,
which observe() reuses inside one_look() (status, a reconcile: one read of each for both).
Between processes, apply/remove hold the catalog's flock exclusively and
observe holds it shared. Marks name their state dir: two stores on one host
never take each other's mirrors for orphans.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import itertools
import os
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import NamedTuple

from vtap_core.driver import Binding, Counters
from vtap_core.errors import NotFound, OperationFailed, TemporaryError, Unsupported, ValidationError
from vtap_core.filter_cache import FilterCache
from vtap_core.filters import compile_filter, with_sampling
from vtap_core.model import Direction, TapFlow, TapSession
from vtap_drivers.linux import tcnl
from vtap_drivers.linux.catalog import Catalog, binding_of, mark_from_alias
from vtap_drivers.linux.nlsock import NetlinkFailure, RtnlSocket
from vtap_drivers.linux.targethealth import NO_ROUTE, health as target_health

HOOKS = ("ingress", "egress")
ETH_HLEN = 14
# vtap's filters share one priority, low so they see packets before most others'
# (their verdict is "continue", so the others still run afterwards). Where someone
# else's filter holds it (the kernel allows one kind and protocol per priority),
# the nearest free one is used instead (free_priority).
FILTER_PRIO = 7
# Root qdiscs that take a filter for a device's egress when an `ingress` qdisc (not
# clsact) holds the hook's place: there a filter that matches nothing (vtap's verdict
# is "continue") leaves the classification as it was. fq_codel, sfq, cake, drr and
# the like drop what no filter classifies; tbf, pfifo and noqueue take no filter.
FILTERABLE_ROOTS = frozenset({"htb", "hfsc", "prio"})
NLM_F_ECHO = 0x8  # a qdisc get is answered only to multicast listeners unless echoed
VXLAN_PREFIX = "vtapx"
GRE_PREFIX = "vtapg"  # gretap/ip6gretap and erspan/ip6erspan targets
SINK_PREFIX = "vtapc"
TC_H_ROOT = 0xFFFFFFFF
IFF_UP = 1
SHARED_PAIRS = 100_000
FEW_DEVICES = 8  # up to this many devices: gets per device; more: one dump of them all
RELEASE_TIMEOUT = 2.0  # seconds; an RCU grace period is usually a few milliseconds
# linux/netlink.h and linux/rtnetlink.h. Not imported from pyroute2: importing it loads every netlink
# family it knows (0.1-0.4 s), and only the rare device changes (self.ipr) need it. A hookscript's
# post-start, inside PVE's `qm start`, must stay fast.
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
RTM_NEWLINK, RTM_GETLINK, RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 16, 18, 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER, RTM_GETACTION = 44, 45, 46, 50


def _netlink_error():
    """pyroute2's NetlinkError class (imported when an error is being handled, not before)."""
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


REQUEST = NLM_F_REQUEST | NLM_F_ACK
CREATE = REQUEST | NLM_F_CREATE | NLM_F_EXCL
DUMP = NLM_F_REQUEST | NLM_F_DUMP
BUSY = (errno.ENOBUFS, errno.EBUSY, errno.EAGAIN, errno.EINTR)  # worth another try


class TcFilter(NamedTuple):
    """One filter on a hook, as a dump shows it."""

    prio: int
    handle: int
    mark: bytes | None  # None: not vtap's
    to_index: int  # where its mirred action copies to
    packets: int
    bytes: int
    refused: int = 0  # copies the target device did not take


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


def free_priority(taken: set) -> int:
    """FILTER_PRIO unless others' filters hold it; then the nearest free priority, lower ones first."""
    for prio in itertools.chain((FILTER_PRIO,), range(FILTER_PRIO - 1, 0, -1), range(FILTER_PRIO + 1, 0x10000)):
        if prio not in taken:
            return prio
    raise OperationFailed("no free tc filter priority left on a hook")


def placement(device: str, hook: str, hook_qdisc: dict | None, root_qdisc) -> str | None:
    """Where a filter for this hook of device goes: None = the clsact hook, else a root qdisc handle ("1:").

    hook_qdisc: the qdisc at ffff:fff1 (clsact, ingress, or None); root_qdisc():
    the root qdisc (called only when needed). An `ingress` qdisc answers for both
    clsact parents, so a filter meant for its egress would land on its ingress block.
    """
    kind = hook_qdisc["kind"] if hook_qdisc and hook_qdisc["kind"] in ("clsact", "ingress") else None
    block = hook_qdisc["blocks"][HOOKS.index(hook)] if kind else 0
    if block:
        raise ValidationError("interface", f"{device}: its {kind} qdisc shares {hook} block {block} with other devices; vtap mirrors only devices with their own {hook} hook")
    if hook == "ingress" or kind != "ingress":
        return None
    root = root_qdisc()
    if root is not None and root["kind"] in FILTERABLE_ROOTS:
        return tcnl.format_handle(root["handle"])
    raise ValidationError(
        "interface",
        f"{device} has an ingress qdisc (not clsact) and a {root['kind'] if root else 'default'} root qdisc, which takes no filter that leaves its traffic as it was; "
        f"its egress can be mirrored with clsact (no ingress qdisc) or with an {'/'.join(sorted(FILTERABLE_ROOTS))} root qdisc",
    )


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


def program_for(binding: Binding, cache: FilterCache | None = None):
    """Classic BPF ops for a mirror binding: filter, minus the tunnel's own packets, sampled."""
    expression = binding.get("filter") or ""
    guard = binding.get("guard") or ""
    if guard:
        expression = f"({expression}) and not ({guard})" if expression else f"not ({guard})"
    return with_sampling(compile_filter(expression, cache=cache), binding.get("sample"))


class TcDataplane:
    """Mirrors in one network namespace through one netlink socket (see module docstring)."""

    def __init__(self, netns: str | None = None, state_dir: str = ".", datapath: str = "tc"):
        self.netns = netns
        self.datapath = datapath  # "tcx": mirrors on the tcx hook where they can be (tcxmirror.py)
        self._tcx_refusals: dict[tuple, str | None] = {}  # program -> why not on tcx
        self.state_dir = os.path.abspath(state_dir)
        self.catalog = Catalog(self.state_dir, netns)
        self.filter_cache = FilterCache(self.state_dir)  # plans compile each expression once, ever
        self._programs: dict[tuple, tuple] = {}  # (filter, guard, sample) -> program, checked, for this process
        self._shared_pairs: dict[tuple, tuple] = {}  # spec pairs many mirrors have (hook, target, filter)
        self._ns_key = f"{netns}/" if netns else ""
        self._ipr = None
        self._nl = None
        self._lock = threading.RLock()
        self._planning = threading.local()  # .view while planning(): one look at the namespace
        self._looking = threading.local()  # .tables while one_look() is open in this thread

    # ------------------------------------------------------------ planning

    def mirror(self, session: str, flow: str, device: str, hook: str, to_device: str, filter: str | None = None, sample: int | None = None, vm: str | None = None, guard: str | None = None, parent: str | None = None) -> Binding:
        """parent: the root qdisc handle ("1:") that takes the filter instead of the clsact hook (see placement)."""
        if hook not in HOOKS:
            raise ValidationError("hook", f"{hook!r} is not ingress or egress")
        shared = self._shared_pairs  # the same pairs in thousands of specs: one copy of each
        if len(shared) > SHARED_PAIRS:  # a follower's lifetime of changed filters
            shared.clear()
        what = (hook, to_device, filter or "", sample or 1, guard or "")
        tail = shared.get(what)  # a plan of 10,000 flows has a few: one look-up instead of five
        if tail is None:
            tail = shared[what] = tuple(shared.setdefault(pair, pair) for pair in zip(("hook", "to", "filter", "sample", "guard"), what))
        spec = (("type", "mirror"), ("device", device)) + tail + ((("parent", parent),) if parent else ())
        binding = Binding(key=f"tc/{self._ns_key}{device}/{hook}/{session}/{flow}", session=session, flow=flow, vm=vm, spec=spec, order=1)
        program = self._program(binding, (filter or "", guard or "", sample or 1))  # refuse a bad expression now, with libpcap's message
        # A mirror placed on a root qdisc (parent) is the cls_bpf fallback _plan asked for.
        if self.datapath == "tcx" and parent is None and self._on_tcx(program):
            binding = replace(binding, spec=spec + (("datapath", "tcx"),))  # another mark: switching is remove + apply
        return binding

    def _on_tcx(self, program) -> bool:
        """Whether a mirror goes on the tcx hook; where it cannot, the log says why (once)."""
        from vtap_drivers.linux import tcxmirror

        asked = tuple(map(tuple, program))
        if asked not in self._tcx_refusals:
            self._tcx_refusals[asked] = tcxmirror.why_not(program)
        why = self._tcx_refusals[asked]
        if why:
            tcxmirror.say_once(why)
        return why is None

    def _program(self, binding: Binding, what: tuple | None = None):
        """program_for(binding), once per (filter, guard, sample) in this process: plans ask for it per flow."""
        what = what or (binding.get("filter"), binding.get("guard"), binding.get("sample"))
        if what not in self._programs:
            self._programs[what] = program_for(binding, self.filter_cache)
        return self._programs[what]

    def vxlan_target(self, session: str, remote: str, port: int, vni: int, local: str | None = None) -> tuple[Binding, str, str]:
        remote = resolve_host(remote)
        _check_local(remote, local)
        device = VXLAN_PREFIX + _short_hash(self.netns, session, remote, port, vni, *((local,) if local else ()))
        spec = (("type", "vxlan"), ("device", device), ("remote", remote), ("port", int(port)), ("vni", int(vni)))
        if local:
            spec += (("local", local),)  # only when given: specs (and marks) of older sessions stay as they were
        binding = Binding(key=f"vxlan/{self._ns_key}{device}", session=session, spec=spec, order=0)
        # The tunnel's own packets may leave through a mirrored device: never copy them again.
        guard = f"udp dst port {int(port)} and dst host {remote}"
        return binding, device, guard

    def gre_target(self, session: str, scheme: str, remote: str, key: int | None, version: int | None = None, local: str | None = None, direction: str | None = None) -> tuple[Binding, str, str]:
        """A gretap/ip6gretap (scheme gre) or erspan/ip6erspan (scheme erspan, key = session id) device.

        ERSPAN type III carries a direction bit, fixed per kernel device: such a
        session has two devices, direction "ingress" and "egress", and each
        mirror copies to the one of its hook (the device's own point of view,
        as a switch port's in ERSPAN: what a VM sends is its tap's ingress).
        """
        from vtap_drivers.linux import grenl

        remote = resolve_host(remote)
        _check_local(remote, local)
        kind = grenl.kind_for(scheme, remote)
        if kind.startswith("ip6") and not local:
            # Without a source address the kernel's ip6 GRE devices stay silent (seen on Debian's 6.1 with ip6erspan).
            raise ValidationError("target local", f"{scheme} over IPv6 needs &local=ADDR (this host's IPv6 source address)")
        if not grenl.kernel_has(kind):
            raise Unsupported("tc dataplane", f"target {scheme}:", f"this kernel has no {kind} devices (module {grenl.MODULES[kind]}); use vxlan://")
        direction = (direction or "ingress") if version == 3 else None
        device = GRE_PREFIX + _short_hash(self.netns, session, kind, remote, key, version, local, *((direction,) if direction else ()))
        spec = (("type", scheme), ("device", device), ("kind", kind), ("remote", remote), ("local", local), ("key", key), ("version", version))
        if direction:
            spec += (("direction", direction),)
        binding = Binding(key=f"{scheme}/{self._ns_key}{device}", session=session, spec=spec, order=0)
        # GRE and ERSPAN are IP protocol 47: never copy the tunnel's own packets again.
        return binding, device, f"proto gre and dst host {remote}"

    def capture_target(self, session: str, path: str, snaplen: int | None, max_size: int | None = None, max_files: int | None = None) -> tuple[Binding, str]:
        from vtap_drivers.linux.capture import check_capture_path

        path = check_capture_path(path)
        # Rotation is in the spec only when asked for: sinks made before it existed keep their names.
        rotation = (("max_size", max_size), ("max_files", max_files)) if max_size else ()
        # Named by everything in its spec (as a VXLAN device is): a changed path or snaplen is a
        # new sink, so the mirrors pointing at the old one are replaced in the same reconcile.
        device = SINK_PREFIX + _short_hash(self.netns, session, path, snaplen, *rotation)
        spec = (("type", "capture"), ("device", device), ("path", path), ("snaplen", snaplen), *rotation)
        return Binding(key=f"pcap/{self._ns_key}{device}", session=session, spec=spec, order=0), device

    def plan_interface(self, session: TapSession, flow: TapFlow, device: str | None = None) -> list[Binding]:
        return self._plan(session, flow, device or flow.source.interface, vm_port=False, vm=None, target_device=None)

    def plan_vm_device(self, session: TapSession, flow: TapFlow, device: str, vm: str | None = None, target_device: str | None = None, macvtap: bool = False) -> list[Binding]:
        # A macvtap device transmits what its VM sends (towards the lower NIC): the hooks of a host interface.
        return self._plan(session, flow, device, vm_port=not macvtap, vm=vm, target_device=target_device)

    def session_target(self, session: TapSession, target_device: str | None = None) -> tuple[list[Binding], str, str | None]:
        """(bindings vtap owns for the target, device to mirror to, guard expression or None)."""
        target = session.target
        if target.kind == "vxlan":
            binding, device, guard = self.vxlan_target(session.name, target.host, target.udp_port, target.vni, target.local)
            return [binding], device, guard
        if target.kind == "gre":
            binding, device, guard = self.gre_target(session.name, "gre", target.host, target.key, local=target.local)
            return [binding], device, guard
        if target.kind == "erspan":
            binding, device, guard = self.gre_target(session.name, "erspan", target.host, target.erspan_id, target.version, target.local)
            if target.version == 3:  # a second device for egress copies (gre_target says why)
                return [binding, self.gre_target(session.name, "erspan", target.host, target.erspan_id, 3, target.local, "egress")[0]], device, guard
            return [binding], device, guard
        if target.kind == "pcap":
            binding, device = self.capture_target(session.name, target.path, session.snaplen, target.max_size, target.max_files)
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
        by_hook = {b.get("direction"): b.get("device") for b in out if b.get("direction")}  # ERSPAN type III
        for hook in hooks_for(flow.direction, vm_port=vm_port):
            args = (session.name, flow.name, device, hook, by_hook.get(hook, to_device), flow.filter, session.sample)
            binding = self.mirror(*args, vm=vm, guard=guard) if self.datapath == "tcx" else None
            if binding is None or binding.get("datapath") != "tcx":  # the device's qdiscs matter to cls_bpf only
                binding = self.mirror(*args, vm=vm, guard=guard, parent=self.placement(device, hook))
                if self.datapath == "tc" and session.target.kind == "pcap" and self._writes_ring_on_tc(binding, session.snaplen):
                    # no clone: a direct-action cls_bpf filter writes the frame into the sink's BPF ring (ringfilter.py)
                    binding = replace(binding, spec=binding.spec + (("sink", "ring"), ("snaplen", session.snaplen)))
            elif session.target.kind == "pcap" and self._sinks_have_rings():  # no clone: the frame goes into the sink's BPF ring
                binding = replace(binding, spec=binding.spec + (("sink", "ring"), ("snaplen", session.snaplen)))
            out.append(binding)
        return out

    @contextmanager
    def planning(self, devices: set | None = None):
        """Plan many flows on one look at the namespace (a link and a qdisc dump instead of gets per
        device); yields the device names. Only for the duration of one plan: qdiscs change.

        devices: the names the plan mirrors or targets, if known; a few of them are looked up
        one by one (a plan of one flow among thousands dumps nothing), without a view.
        """
        if devices is not None and len(devices) <= FEW_DEVICES:
            with self._kernel():
                present = {name for name in devices if self._link(name=name) is not None}
            self._planning.view = None
            yield present
            return
        with self._kernel():
            if self.look_open():  # observe reads every link next: one dump for both
                indexes = {link["name"]: link["index"] for link in self._once("links", self._brief_links)}
            else:
                indexes = self._link_indexes()
            self._planning.view = (indexes, self._once("qdiscs", self._qdisc_places))
        try:
            yield set(indexes)
        finally:
            self._planning.view = None

    @contextmanager
    def one_look(self):
        """While open (in this thread), plan and observe read each namespace table (links, qdiscs) once:
        `status` and a reconcile plan and observe on one look at the namespace instead of two.
        apply() and remove() drop what was read: they change it."""
        if self.look_open():
            yield  # the outer look holds
            return
        self._looking.tables = {}
        try:
            yield
        finally:
            self._looking.tables = None

    def look_open(self) -> bool:
        """Whether one_look() is open in this thread."""
        return getattr(self._looking, "tables", None) is not None

    def _once(self, table: str, read):
        """read(); inside one_look(), what it gave the first time."""
        tables = getattr(self._looking, "tables", None)
        if tables is None:
            return read()
        if table not in tables:
            tables[table] = read()
        return tables[table]

    @contextmanager
    def _changing(self):
        """apply/remove: they read the namespace afresh, and an open look reads it again after them."""
        was_open = self.look_open()
        self._looking.tables = None
        try:
            yield
        finally:
            if was_open:
                self._looking.tables = {}

    def planning_view(self) -> tuple | None:
        """What a plan made inside planning() depends on besides sessions and flows (hashable); None without a view."""
        if getattr(self._planning, "view", None) is None:
            return None
        indexes, places = self._planning.view
        # In the order the kernel listed them, not sorted: two looks listed otherwise only cost a plan.
        qdiscs = tuple((i, w, q["kind"], q["handle"], q["blocks"]) for i, p in places.items() for w, q in p.items() if q)
        return tuple(indexes.items()), qdiscs

    def placement(self, device: str, hook: str) -> str | None:
        """placement() for a device as the kernel has it now (a device not there yet: the clsact hook)."""
        view = getattr(self._planning, "view", None)
        if view is not None:
            index = view[0].get(device)
            place = view[1].get(index, {})
            return placement(device, hook, place.get("hook"), lambda: place.get("root")) if index else None
        with self._kernel():
            link = self._link(name=device)
            if link is None:
                return None
            return placement(device, hook, self._qdisc_at(link["index"], tcnl.TC_H_CLSACT), lambda: self._qdisc_at(link["index"], tcnl.TC_H_ROOT))

    # ------------------------------------------------------------ netlink plumbing

    @property
    def nl(self) -> RtnlSocket:
        """The fast socket: tc and link dumps, batched tc requests."""
        if self._nl is None:
            try:
                self._nl = RtnlSocket(self.netns)
            except FileNotFoundError:
                raise NotFound(f"netns {self.netns}: no such network namespace") from None
            except PermissionError:
                raise OperationFailed(f"netns {self.netns}: entering a network namespace needs root") from None
        return self._nl

    @property
    def ipr(self):
        """pyroute2's socket: creating, changing and deleting vtap's own devices (rare)."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            try:
                # flags=0: use the namespace, never create it
                self._ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
            except FileNotFoundError:
                raise NotFound(f"netns {self.netns}: no such network namespace") from None
        return self._ipr

    @contextmanager
    def _kernel(self):
        """The sockets, one caller at a time; what netlink reports becomes a vtap error."""
        with self._lock:
            try:
                yield
            except (NetlinkFailure, OSError, _netlink_error()) as exc:
                netlink = isinstance(exc, (NetlinkFailure, _netlink_error()))
                code = getattr(exc, "code", None) if netlink else exc.errno
                if not netlink and code not in BUSY:
                    raise
                self.close()  # a socket may hold half a reply now: start afresh next time
                where = f" in netns {self.netns}" if self.netns else ""
                if code in BUSY:
                    raise TemporaryError(f"netlink{where}: {exc}") from None
                if code == errno.EPERM:
                    raise OperationFailed(f"netlink{where}: {exc}: changing tc and links needs root (CAP_NET_ADMIN)") from None
                raise OperationFailed(f"netlink{where}: {exc}") from None

    def save_filter_cache(self) -> None:
        """Keep what this process compiled for the next one; a cache that cannot be written only costs time."""
        try:
            self.filter_cache.save()
        except OSError:
            pass

    def close(self) -> None:
        self.save_filter_cache()
        with self._lock:
            for sock in (self._nl, self._ipr):
                if sock is not None:
                    sock.close()
            self._nl = self._ipr = None

    def _link(self, name: str | None = None, index: int = 0) -> dict | None:
        try:
            return tcnl.read_link(*self.nl.get(tcnl.link_query(name=name, index=index), RTM_GETLINK, REQUEST))
        except NetlinkFailure as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return None
            raise

    def _qdisc_at(self, ifindex: int, parent: int) -> dict | None:
        """One device's qdisc at TC_H_CLSACT or TC_H_ROOT (read_qdisc_place), or None."""
        try:
            return tcnl.read_qdisc_place(*self.nl.get(tcnl.qdisc_query(ifindex, parent), RTM_GETQDISC, REQUEST | NLM_F_ECHO))
        except NetlinkFailure as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return None
            raise

    def _clsact_indexes(self, kinds: dict | None = None) -> set[int]:
        """ifindexes of the devices that have a clsact qdisc (one dump, unless `kinds` (_hook_kinds) has it already)."""
        kinds = self._hook_kinds() if kinds is None else kinds
        return {index for index, kind in kinds.items() if kind == "clsact"}

    def _hook_kinds(self) -> dict[int, str | None]:
        """{ifindex: kind of the qdisc at the clsact hook (clsact, ingress)} of every device that has one
        (one qdisc dump, read down to the kind: observe needs no more; none if this look has them)."""
        places = (getattr(self._looking, "tables", None) or {}).get("qdiscs")
        if places is not None:
            return {index: place["hook"]["kind"] for index, place in places.items() if place["hook"]}
        return self._once("kinds", self._read_hook_kinds)

    def _read_hook_kinds(self) -> dict[int, str | None]:
        kinds: dict[int, str | None] = {}
        for data, start, end in self.nl.stream(tcnl.qdisc_dump_query(), RTM_GETQDISC, DUMP):
            index, parent, kind = tcnl.read_qdisc_kind(data, start, end)
            if parent == tcnl.TC_H_CLSACT:
                kinds[index] = kind
        return kinds

    def _qdisc_places(self) -> dict[int, dict]:
        """{ifindex: {"hook": qdisc at ffff:fff1, "root": root qdisc}} of every device (one dump).

        Read-only: devices whose qdiscs are alike share one dict of each (10,000 devices
        with a clsact and a noqueue have a handful, not 30,000 dicts held while status observes).
        """
        found: dict[int, list] = {}
        qdiscs: dict[tuple, dict] = {}
        for reply in self.nl.stream(tcnl.qdisc_dump_query(), RTM_GETQDISC, DUMP):
            index, qdisc = tcnl.read_qdisc(*reply)  # (handle, parent, kind, blocks)
            where = PLACE_OF_PARENT.get(qdisc[1])
            if where is not None:
                shared = qdiscs.get(qdisc)  # no "index" in it: a shared dict is every such device's
                if shared is None:
                    shared = qdiscs[qdisc] = dict(zip(("handle", "parent", "kind", "blocks"), qdisc))
                found.setdefault(index, [None, None])[where] = shared
        places: dict[tuple, dict] = {}
        return {index: places.setdefault((id(hook), id(root)), {"hook": hook, "root": root}) for index, (hook, root) in found.items()}

    def _places_of(self, ifindexes: set) -> dict[int, dict]:
        """_qdisc_places() of these devices: gets for a few, one dump for many."""
        if len(ifindexes) > FEW_DEVICES:
            return self._qdisc_places()
        return {i: {"hook": self._qdisc_at(i, tcnl.TC_H_CLSACT), "root": self._qdisc_at(i, tcnl.TC_H_ROOT)} for i in ifindexes}

    def _links(self, kind: str | None = None) -> list[dict]:
        """Every link, or those of one kind (the kernel filters by kind)."""
        links = [tcnl.read_link(*reply) for reply in self.nl.stream(tcnl.link_query(kind=kind), RTM_GETLINK, DUMP)]
        return [link for link in links if kind is None or link["kind"] == kind]

    def _brief_links(self) -> list[dict]:
        """Every link, read as tcnl.read_link_brief (name, index, flags, MTU; vtap's own devices whole): one dump."""
        return [tcnl.read_link_brief(*reply) for reply in self.nl.stream(tcnl.link_query(), RTM_GETLINK, DUMP)]

    def ifindex(self, name: str) -> int | None:
        with self._kernel():
            link = self._link(name=name)
            return link["index"] if link is not None else None

    def devices(self) -> set[str]:
        with self._kernel():
            return set(self._link_indexes())

    def _link_indexes(self) -> dict[str, int]:
        """{name: ifindex} of every link (one dump, names only: plans ask for it every time)."""
        replies = self.nl.stream(tcnl.link_names_query(), RTM_GETLINK, DUMP)
        return dict(tcnl.read_link_name(*reply) for reply in replies)

    def device_kinds(self) -> dict[str, str | None]:
        """{device name: IFLA_INFO_KIND} (None for a device without one, e.g. a physical NIC)."""
        with self._kernel():
            return {link["name"]: link["kind"] for link in self._links()}

    def _mirred_marks(self) -> set[bytes]:
        """Marks of every vtap mirred action in the namespace (one dump; finds uncatalogued orphans).

        A deleted filter's action stays listed until the kernel releases it
        (after an RCU grace period), so this says "maybe there", never "there".
        """
        found = set()
        for reply in self.nl.stream(tcnl.mirred_dump_request(), RTM_GETACTION, DUMP):
            found.update(c for c in tcnl.read_action_cookies(*reply) if self.catalog.owns(c))
        return found

    def _mirred_actions(self) -> dict[bytes, tuple]:
        """{mark: (target ifindex, packets, bytes, refused)} of this store's mirred actions (one dump).

        Like _mirred_marks, "maybe there": observe() takes only those a filter dump shows.
        """
        found = {}
        for reply in self.nl.stream(tcnl.mirred_dump_request(), RTM_GETACTION, DUMP):
            for cookie, *figures in tcnl.read_mirred_actions(*reply):
                if self.catalog.owns(cookie):
                    found[cookie] = tuple(figures)
        return found

    def _filter_marks(self, ifindex: int, hook: str, parent: str | None = None) -> list[bytes]:
        """The marks of the filters on a device's hook (or root qdisc `parent`); one dump, read down to the marks only."""
        return [mark for reply in self._filter_dump(ifindex, hook, parent) if (mark := tcnl.read_filter_mark(*reply)) is not None]

    def _mirrors_in_place(self, mirrors: dict, hook_kinds) -> list[tuple]:
        """(ifindex, hook, parent, mark, entry) of the mirrors (catalog.mirrors()) the kernel holds.

        vtap adds its filters at FILTER_PRIO with a handle named by the mark
        (tcnl.handle_for): one get per filter, many per send, finds each. A hook
        where a get does not (a filter moved to another priority, one added before
        vtap chose handles, one gone) is dumped whole, as every hook once was,
        unless hook_kinds() (_hook_kinds) shows no qdisc at it: nothing to dump.
        """
        asked = [(ifindex, hook, parent, mark, entry) for mark, (ifindex, hook, parent, entry) in mirrors.items()]

        def query(entry):
            ifindex, hook, parent, mark, _ = entry
            return tcnl.filter_query(ifindex, hook, FILTER_PRIO, tcnl.handle_for(mark), parent=_parent_number(parent))

        found, unsure = [], set()
        has_mark = tcnl.filter_has_mark
        for index, reply in self.nl.gets(map(query, asked), RTM_GETTFILTER):
            entry = asked[index]
            if reply.__class__ is not NetlinkFailure and has_mark(*reply, entry[3]):
                found.append(entry)
            else:
                unsure.add(entry[:3])
        if not unsure:
            return found
        found = [entry for entry in found if entry[:3] not in unsure]  # the dump tells for the whole hook
        for ifindex, hook, parent in unsure:
            if parent is None and ifindex not in hook_kinds():
                continue  # no clsact (nor ingress qdisc): no filters, as on a device vtap has not touched yet
            for mark in self._filter_marks(ifindex, hook, parent):
                wanted = mirrors.get(mark)
                if wanted is not None and wanted[:3] == (ifindex, hook, parent):
                    found.append((ifindex, hook, parent, mark, wanted[3]))
        return found

    def _filter_dump(self, ifindex: int, hook: str, parent: str | None) -> list:
        try:
            return self.nl.dump(tcnl.filter_query(ifindex, hook, parent=_parent_number(parent)), RTM_GETTFILTER, DUMP)
        except NetlinkFailure as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return []  # no clsact (or no device): no filters
            raise

    def _filters(self, ifindex: int, hook: str, parent: str | None = None) -> list[TcFilter]:
        """Every filter on a device's hook, or on its root qdisc `parent` (vtap's have a mark). One dump."""
        out = []
        for reply in self._filter_dump(ifindex, hook, parent):
            prio, handle, mirred = tcnl.read_filter(*reply)
            if not handle:
                continue  # the per-priority header entry, not a filter
            if mirred is not None and self.catalog.owns(mirred[0]):
                out.append(TcFilter(prio, handle, *mirred))
            else:
                out.append(TcFilter(prio, handle, None, 0, 0, 0))
        return out

    # ------------------------------------------------------------ observe

    def observe(self, vm: str | None = None) -> list[Binding]:
        """What vtap has in this namespace: one filter dump per (device, hook) vtap used, one action dump.

        With `vm`, only that VM's mirrors and what belongs to no VM: all a reconcile scoped to it looks at.
        The filter dumps say which mirrors are in place (a deleted filter's action
        lingers in the action dump until the kernel releases it); the action dump
        gives their counters and targets, and the marks no catalog entry names.
        """
        with self._kernel(), self.catalog.locked(shared=True) as catalog:
            links: dict[int, dict | None] = {}
            underlays: dict[str, tuple | None] = {}
            healths: dict[tuple, object] = {}

            def link_of(index, whole=False):  # whole: with kind and counters (a target's), not brief
                link = links.get(index, links)
                if link is links or (whole and link is not None and link.get("brief")):
                    link = links[index] = self._link(index=index) if index else None
                return link

            def name_of(index):
                link = link_of(index)
                return link["name"] if link is not None else None

            mirrors = catalog.mirrors()
            if vm is not None:  # the hooks holding a mirror of that VM or of none, whole
                theirs = {(ifindex, hook) for ifindex, hook, _, entry in mirrors.values() if entry.get("vm") in (vm, None)}
                mirrors = {mark: mirror for mark, mirror in mirrors.items() if mirror[:2] in theirs}
            hooks = {(ifindex, hook) for ifindex, hook, *_ in mirrors.values()}
            every_link = None
            if len(hooks) > FEW_DEVICES:  # many devices: one link dump instead of a get per source and target
                every_link = self._once("links", self._brief_links)
                links.update((link["index"], link) for link in every_link)
            kinds = None

            def hook_kinds():  # _hook_kinds(), read once and only if needed
                nonlocal kinds
                kinds = self._hook_kinds() if kinds is None else kinds
                return kinds

            out = []
            in_place = self._mirrors_in_place(mirrors, hook_kinds)
            used = {ifindex for ifindex, *_ in in_place}
            actions = self._mirred_actions()  # after the filter dumps: each filter they showed has its action listed
            ring_programs, ring_ids, writers = None, {}, []
            for ifindex, hook, parent, mark, entry in in_place:
                action = actions.get(mark)
                if action is None:
                    if not _writes_ring(entry):
                        continue  # deleted since the filter dump
                    if ring_programs is None:  # a dump of each hook holding a ring writer: their program ids
                        ring_programs = self._ring_programs(in_place, actions)
                    binding = self._observe_ring_writer(ifindex, hook, parent, mark, entry, ring_programs.get(mark), link_of, name_of, hook_kinds, ring_ids)
                    if binding is not None:
                        out.append(binding)
                        writers.append(binding)
                    continue
                to_index, packets, nbytes, refused = action
                # At ingress the kernel counts from the network header; count whole frames.
                nbytes += ETH_HLEN * packets if hook == "ingress" and parent is None else 0
                if (ifindex, to_index) not in healths:  # a device's two hooks mirror to one target
                    healths[ifindex, to_index] = self._target_health(link_of(ifindex), link_of(to_index, whole=True), underlays)
                binding = binding_of(entry, Counters(packets, nbytes, refused, healths[ifindex, to_index]))
                # What the filter really mirrors: the target device may have gone or been
                # recreated, the device renamed (names swapped): then the spec shows it.
                to_name, device_name = name_of(to_index) or "", name_of(ifindex) or ""
                # An ingress qdisc took an egress filter: it sits on its ingress block.
                moved = hook == "egress" and parent is None and hook_kinds().get(ifindex) != "clsact"
                if moved or binding.get("to") != to_name or binding.get("device") != device_name:
                    binding = _drifted(binding, mark, to=to_name, device=device_name, **({"hook": "ingress"} if moved else {}))
                out.append(binding)
            known = catalog.bindings
            out.extend(self._unknown(mark) for mark in actions if mark.hex() not in known)
            out.extend(self._unknown(mark) for mark in self._pinned_ring_writers(catalog) if mark.hex() not in known and mark not in actions)
            on_tcx = self._observe_tcx(catalog, vm, link_of, name_of, healths, underlays)
            out.extend(on_tcx)
            out.extend(_with_ring_drops(self._observe_devices(catalog, every_link), on_tcx + writers))
            out.extend(self._unused_clsacts(catalog, used, None if vm is None else {ifindex for ifindex, _ in hooks}, kinds))
            return out

    def _pinned_ring_writers(self, catalog) -> list[bytes]:
        """Marks of the datapath=tc ring writers pinned for this store (one listdir): how orphans are found."""
        from vtap_drivers.linux import ringfilter, tcxmirror

        return ringfilter.pinned_marks(tcxmirror.pin_dir(self.netns), catalog.owns)

    def _ring_programs(self, in_place: list, actions: dict) -> dict[bytes, int]:
        """{mark: program id} of the datapath=tc ring writers (direct-action cls_bpf: no action) on the hooks holding one."""
        places = {(ifindex, hook, parent) for ifindex, hook, parent, mark, entry in in_place if mark not in actions and _writes_ring(entry)}
        found = {}
        for ifindex, hook, parent in places:
            for reply in self._filter_dump(ifindex, hook, parent):
                ring = tcnl.read_ring_filter(*reply)
                if ring is not None:
                    found[ring[0]] = ring[1]
        return found

    def _observe_ring_writer(self, ifindex, hook, parent, mark, entry, prog_id, link_of, name_of, hook_kinds, ring_ids) -> Binding | None:
        """A datapath=tc ring writer: counters from its program; drifted when it writes into another ring
        than its sink's pinned one (the copies reach no file) or its device was renamed or its hook moved."""
        from vtap_drivers.linux import bpfring, ringfilter

        program = ringfilter.read(prog_id) if prog_id else None
        if program is None:
            return None  # deleted since the filter dump
        sink = dict(entry["spec"]).get("to")
        if sink not in ring_ids:
            path = self._sink_ring(sink)
            ring_ids[sink] = bpfring.pinned_id(path) if path else None
        to_name = sink if ring_ids[sink] is not None and ring_ids[sink] in program.maps[1:] else ""
        sink_link = self._link(name=sink) if to_name else None
        health = self._target_health(link_of(ifindex), sink_link, {})
        figures = program.counters
        binding = binding_of(entry, Counters(figures["packets"], figures["bytes"], figures["clone_failures"], health))
        moved = hook == "egress" and parent is None and hook_kinds().get(ifindex) != "clsact"
        device_name = name_of(ifindex) or ""
        if moved or to_name != sink or binding.get("device") != device_name:
            binding = _drifted(binding, mark, to=to_name, device=device_name, **({"hook": "ingress"} if moved else {}))
        return binding

    def _observe_tcx(self, catalog, vm, link_of, name_of, healths, underlays) -> list[Binding]:
        """vtap's tcx mirrors, from their pins: as planned, or drifted (device renamed, target
        recreated); a pin no catalog entry names, or whose link is defunct (device gone), an orphan."""
        from vtap_drivers.linux import tcxmirror

        pinned = tcxmirror.pins(self.netns, catalog.owns)
        if not pinned:
            return []
        out, rings = [], {}
        with tcxmirror.in_netns(self.netns):
            for pin in pinned:
                entry = catalog.bindings.get(pin.mark.hex())
                if entry is None:
                    out.append(self._unknown(pin.mark))
                    continue
                if vm is not None and entry.get("vm") not in (vm, None):
                    continue
                found = tcxmirror.read(pin)
                if found is None:
                    continue  # removed meanwhile
                if not found.ifindex:  # its device is gone: the mirror is missing, the pin an orphan to remove
                    out.append(self._unknown(pin.mark))
                    continue
                ifindex, to_index = found.ifindex, pin.to_index
                if (ifindex, to_index) not in healths:
                    healths[ifindex, to_index] = self._target_health(link_of(ifindex), link_of(to_index, whole=True), underlays)
                figures = found.counters
                binding = binding_of(entry, Counters(figures["packets"], figures["bytes"], figures["clone_failures"], healths[ifindex, to_index]))
                actual = {"to": name_of(to_index) or "", "device": name_of(ifindex) or "", "hook": found.hook}
                if binding.get("sink") == "ring" and not self._writes_to_sink_ring(pin, actual["to"], rings):
                    actual["to"] = ""  # its ring is not the one the sink's capture reads: the copies reach no file
                if any(binding.get(name) != value for name, value in actual.items()):
                    binding = _drifted(binding, pin.mark, **actual)
                out.append(binding)
        return out

    def _sinks_have_rings(self) -> bool:
        """Whether pcap sinks get a BPF ring here: pins that outlive the process, a machine whose plain
        accesses order the ring's positions (bpfring.usable_here), and datapath=tcx on a kernel with tcx,
        or datapath=tc on one with BPF ring buffers (direct-action cls_bpf ring writers, ringfilter.py)."""
        from vtap_drivers.linux import bpfring, ringfilter, tcxmirror

        if not (tcxmirror.pins_outlive_the_process() and bpfring.usable_here()):
            return False
        return tcxmirror.kernel_has_tcx() if self.datapath == "tcx" else ringfilter.kernel_has_ringbuf()

    def _writes_ring_on_tc(self, binding: Binding, snaplen: int | None) -> bool:
        """Whether a datapath=tc mirror to a pcap sink is a ring writer (translatable, sinks have rings)."""
        from vtap_drivers.linux import ringfilter

        if not self._sinks_have_rings():
            return False
        asked = ("ring", snaplen) + tuple(map(tuple, self._program(binding)))
        if asked not in self._tcx_refusals:
            self._tcx_refusals[asked] = None if ringfilter.translates(self._program(binding), snaplen) else "untranslatable"
        return self._tcx_refusals[asked] is None

    def _sink_ring(self, device: str) -> str | None:
        """Where a pcap sink's BPF ring buffer is pinned, when sinks get one; else None."""
        from vtap_drivers.linux import bpfring, tcxmirror

        return bpfring.ring_path(tcxmirror.pin_dir(self.netns), device) if self._sinks_have_rings() else None

    def _writes_to_sink_ring(self, pin, sink: str, rings: dict) -> bool:
        """Whether a ring-writing mirror's program holds the ring pinned for its sink now (rings: id by sink, cached)."""
        from vtap_drivers.linux import bpfring

        if sink not in rings:
            path = self._sink_ring(sink) if sink else None
            rings[sink] = bpfring.pinned_id(path) if path else None
        return rings[sink] is not None and rings[sink] in bpfring.program_maps(pin.path)

    def _orphan_rings(self, sinks: set) -> list[Binding]:
        """BPF rings pinned for sinks that are gone (a run killed between removing the sink and its ring)."""
        from vtap_drivers.linux import bpfring, tcxmirror

        out = []
        for device in bpfring.ring_devices(tcxmirror.pin_dir(self.netns)):
            if device not in sinks:
                out.append(Binding(key=f"unknown/{self._ns_key}ring-{device}", session="?", spec=(("type", "ring"), ("device", device)), order=0))
        return out

    def _unused_clsacts(self, catalog, used: set, among: set | None = None, kinds: dict | None = None) -> list[Binding]:
        """clsact qdiscs vtap added that hold no filter of anyone's (a run killed before it removed them).

        Only devices without a vtap filter are looked at (and only those `among`, when given),
        so this costs nothing while mirrors are in place. kinds: _hook_kinds() if observe read it already.
        """
        candidates = {device: ifindex for device, ifindex in catalog.qdiscs.items() if ifindex not in used and (among is None or ifindex in among)}
        if not candidates:
            return []
        present = self._clsact_indexes(kinds)
        out = []
        for device, ifindex in sorted(candidates.items()):
            if ifindex in present and not any(self._filters(ifindex, hook) for hook in HOOKS):
                spec = (("type", "clsact"), ("device", device), ("ifindex", ifindex))
                out.append(Binding(key=f"clsact/{self._ns_key}{device}", session="?", spec=spec, order=0))
        return out

    def _observe_devices(self, catalog, every_link: list | None = None) -> list[Binding]:
        from vtap_drivers.linux.capture import running_captures

        out = []
        captures = None
        # One dump, sorted by kind here: not every kernel filters a link dump by kind.
        by_kind: dict[str, list] = {}
        for link in self._links() if every_link is None else every_link:
            by_kind.setdefault(link["kind"], []).append(link)
        for kind in ("vxlan", "ifb", "gretap", "ip6gretap", "erspan", "ip6erspan"):
            for link in by_kind.get(kind, []):
                mark = mark_from_alias(link["alias"])
                if not catalog.owns(mark):
                    continue
                binding = catalog.binding(mark)
                if binding is None:
                    out.append(self._unknown(mark, link["name"]))
                    continue
                if not link["flags"] & IFF_UP:
                    out.append(replace(binding, broken="down (apply brings it up)"))
                    continue
                if kind == "vxlan":
                    actual = {"remote": link["vxlan"]["remote"], "port": link["vxlan"]["port"], "vni": link["vxlan"]["vni"]}
                    if binding.get("local") or link["vxlan"].get("local"):
                        actual["local"] = link["vxlan"].get("local")
                elif kind != "ifb":
                    actual = {name: link["tunnel"][name] for name in ("remote", "local", "key", "version", "direction")}
                else:
                    if captures is None:
                        captures = running_captures(self.state_dir)
                    process = captures.get(binding.get("device"))
                    if process is None:
                        out.append(replace(binding, broken="no capture process writes its copies to the file (apply starts one)"))
                        continue
                    actual = {"path": process["path"], "snaplen": process["snaplen"], "max_size": process.get("max_size"), "max_files": process.get("max_files")}
                if any(binding.get(name) != value for name, value in actual.items()) or (kind == "ifb" and not self._capture_reads_its_ring(binding.get("device"), process)):
                    binding = _drifted(binding, mark, **actual)
                if kind == "ifb":
                    binding = replace(binding, counters=self._capture_counters(binding.get("device"), link["index"]))
                out.append(binding)
        out.extend(self._orphan_rings({link["name"] for link in by_kind.get("ifb", [])}))
        return out

    def _capture_reads_its_ring(self, device: str, process: dict) -> bool:
        """The capture reads the BPF ring its sink should have, and that ring is pinned (no ring wanted: reads none)."""
        from vtap_drivers.linux import bpfring

        wanted = self._sink_ring(device)
        return process.get("ring") == wanted and (wanted is None or bpfring.pinned_id(wanted) is not None)

    def _target_health(self, source: dict | None, target: dict | None, underlays: dict):
        """Can the copies reach the target whole (targethealth.py)? underlays caches the route per VXLAN remote."""
        if source is None or target is None:
            return None
        remote = (target["vxlan"] or {}).get("remote") if target["kind"] == "vxlan" else None
        if remote and remote not in underlays:
            underlays[remote] = self._underlay(remote)
        return target_health(source, target, underlays.get(remote))

    def _underlay(self, remote: str) -> tuple[str, int] | None:
        """(device, MTU) of the route to a tunnel's remote end; NO_ROUTE without one; None if unknown."""
        try:
            (route,) = self.ipr.route("get", dst=remote)
        except _netlink_error() as exc:
            return NO_ROUTE if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH) else None
        link = self._link(index=route.get_attr("RTA_OIF") or 0)
        if link is None:
            return None
        metrics = route.get_attr("RTA_METRICS")
        route_mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
        mtus = [mtu for mtu in (route_mtu, link["mtu"]) if mtu]
        return (link["name"], min(mtus)) if mtus else None

    def _capture_counters(self, device: str, index: int) -> Counters:
        """Frames in the pcap file, and every copy lost on the way: the ring full, the sink's own drops."""
        from vtap_drivers.linux.capture import capture_counts

        counts = capture_counts(self.state_dir, device) or {}
        try:
            (link,) = self.ipr.get_links(index)
            sink = link.get_attr("IFLA_STATS64") or {}
        except _netlink_error():
            sink = {}  # the sink went away since the dump: the next observe sees it gone
        dropped = counts.get("ring_dropped", 0) + sink.get("tx_dropped", 0)
        return Counters(packets=counts.get("frames", 0), dropped=dropped)

    def _unknown(self, mark: bytes, device: str | None = None) -> Binding:
        """Something vtap marked but no catalog names (the state dir was lost): an orphan."""
        spec = (("type", "unknown"), ("mark", mark.hex()), ("device", device))
        return Binding(key=f"unknown/{self._ns_key}{mark.hex()}", session="?", spec=spec, order=1 if device is None else 0)

    # ------------------------------------------------------------ apply

    def prepare(self, bindings) -> None:
        """Name now, in the catalog, every mark and clsact qdisc apply(bindings) would add.

        The catalog is the only file apply writes. Written here, before the store
        and the kernel, a full disk fails the command while nothing has changed;
        apply then finds nothing new to write. Naming more than the kernel holds is safe.
        """
        bindings = unique(bindings)
        mirrors = [b for b in bindings if b.get("type") == "mirror"]
        with self._kernel(), self.catalog.locked() as catalog:
            indexes = self._indexes({b.get("device") for b in mirrors}) if mirrors else {}
            for binding in bindings:
                if binding.get("type") in ("vxlan", "capture"):
                    catalog.remember(binding)
                elif binding.get("type") == "mirror" and binding.get("device") in indexes:
                    catalog.remember(binding, indexes[binding.get("device")])
            on_tcx = {b.get("device") for b in mirrors if b.get("datapath") == "tcx"} - {b.get("device") for b in mirrors if b.get("datapath") != "tcx"}
            indexes = {device: ifindex for device, ifindex in indexes.items() if device not in on_tcx}  # no clsact for those
            # Devices whose clsact the catalog names already need no look: that stays so either way.
            unsure = {device: ifindex for device, ifindex in indexes.items() if catalog.qdiscs.get(device) != ifindex}
            hooked = {i for i, place in self._places_of(set(unsure.values())).items() if place["hook"]} if unsure else set()
            for device, ifindex in unsure.items():
                if ifindex not in hooked:  # clsact or someone's ingress qdisc: vtap adds none there
                    catalog.qdiscs[device] = ifindex
            try:
                catalog.save()
            except OSError as exc:
                raise OperationFailed(f"catalog {catalog.path}: cannot write ({exc.strerror or exc})") from None

    def apply(self, bindings) -> None:
        bindings = sorted(unique(bindings), key=lambda b: b.order)
        for binding in bindings:
            if binding.get("type") not in ("mirror", "vxlan", "capture", "gre", "erspan"):
                raise OperationFailed(f"{binding.key}: the tc dataplane cannot apply a {binding.get('type')!r} binding")
        with self._changing(), self._kernel(), self.catalog.locked() as catalog:
            done: list[Binding] = []
            try:
                targets = [b for b in bindings if b.get("type") != "mirror"]
                for binding in targets:
                    catalog.remember(binding)
                if targets:
                    catalog.save()  # before the kernel: a crash leaves nothing unnamed
                for binding in targets:
                    if binding.get("type") == "vxlan":
                        self._ensure_vxlan(binding, done)
                    elif binding.get("type") in ("gre", "erspan"):
                        self._ensure_gre(binding, done)
                    else:
                        self._ensure_capture(binding, done)
                self._apply_mirrors([b for b in bindings if b.get("type") == "mirror"], catalog, done)
            except Exception as exc:
                self._remove(list(reversed(done)), catalog)
                self._forget_qdiscs_never_added(catalog)
                why = str(exc) if isinstance(exc, OperationFailed) else f"{type(exc).__name__}: {exc}"
                catalog.note_failure(bindings, why)
                catalog.save_or_keep()
                raise
            catalog.clear_failures(bindings)
            # Devices that went away (a VM stopped or migrated off this host) took their filters with them:
            # forget their entries here too, or a host VMs only arrive on keeps them forever. After the kernel
            # work, so the new mirrors are not held up by the link dump.
            self._forget_what_is_gone(catalog)
            catalog.save()
        self.save_filter_cache()

    def _forget_qdiscs_never_added(self, catalog: Catalog) -> None:
        """prepare() named clsact qdiscs this failed apply did not get to add: they are not vtap's."""
        present = self._clsact_indexes()
        for device, ifindex in list(catalog.qdiscs.items()):
            if ifindex not in present:
                catalog.qdiscs.pop(device)

    def apply_failures(self) -> list[tuple]:
        """(session, flow, why) of bindings whose last apply failed (status shows them; another process may have applied)."""
        with self.catalog.locked(shared=True) as catalog:
            return [tuple(entry) for entry in catalog.failures.values()]

    def _indexes(self, names: set) -> dict[str, int]:
        """ifindex by name for these devices: a few gets, or one dump when there are many."""
        if len(names) > FEW_DEVICES:
            return {name: index for name, index in self._link_indexes().items() if name in names}
        found = {name: self._link(name=name) for name in names}
        return {name: link["index"] for name, link in found.items() if link is not None}

    def _apply_mirrors(self, bindings: list[Binding], catalog: Catalog, done: list) -> None:
        if not bindings:
            return
        where = f" in netns {self.netns}" if self.netns else ""
        indexes = self._indexes({b.get("device") for b in bindings} | {b.get("to") for b in bindings})
        for binding in bindings:
            for name, what in ((binding.get("device"), "interface"), (binding.get("to"), "target device")):
                if name not in indexes:
                    raise OperationFailed(f"{binding.key}: {what} {name} does not exist{where}")
            catalog.remember(binding, indexes[binding.get("device")])
        catalog.save()  # before the kernel: a crash leaves nothing unnamed
        on_tcx = [b for b in bindings if b.get("datapath") == "tcx"]
        if on_tcx:
            self._attach_tcx(on_tcx, indexes, catalog, done)
            bindings = [b for b in bindings if b.get("datapath") != "tcx"]
            if not bindings:
                return
        places = self._places_of({indexes[b.get("device")] for b in bindings})
        for binding in bindings:
            self._check_placement(binding, places.get(indexes[binding.get("device")], {}))
        on_clsact = {b.get("device") for b in bindings if not b.get("parent")}
        devices = sorted(d for d in on_clsact if not (places.get(indexes[d], {}).get("hook")))
        for device in devices:
            catalog.qdiscs[device] = indexes[device]
        if devices:
            catalog.save()  # the qdiscs too: one a killed run added is still known as vtap's
        added = self.nl.requests([(tcnl.qdisc_request(indexes[d]), RTM_NEWQDISC, CREATE) for d in devices])
        fresh = set()
        for device, failure in zip(devices, added):
            if failure is None:
                fresh.add(device)  # vtap added it, so it holds no filters yet
            elif failure.code == errno.EEXIST:  # someone added one meanwhile: theirs, use it if it is right
                catalog.qdiscs.pop(device, None)
                hook_qdisc = self._qdisc_at(indexes[device], tcnl.TC_H_CLSACT)
                for binding in bindings:
                    if binding.get("device") == device:
                        self._check_placement(binding, {"hook": hook_qdisc, "root": self._qdisc_at(indexes[device], tcnl.TC_H_ROOT)})
            else:
                raise OperationFailed(f"interface {device}: cannot add a clsact qdisc: {failure}")
        with ExitStack() as loaded:  # ring writers' programs stay open until the kernel has its filters
            self._add_filters(bindings, indexes, fresh, catalog, done, loaded)

    def _add_filters(self, bindings: list[Binding], indexes: dict, fresh: set, catalog: Catalog, done: list, loaded: ExitStack) -> None:
        present: dict[tuple, set] = {}
        prios: dict[tuple, int] = {}
        requests, pending, writers = [], [], {}
        for binding in bindings:
            device, hook, parent = binding.get("device"), binding.get("hook"), binding.get("parent")
            place = (device, hook, parent)
            if place not in present:
                found = [] if device in fresh and not parent else self._filters(indexes[device], hook, parent)
                present[place] = {f.mark for f in found}
                prios[place] = free_priority({f.prio for f in found if f.mark is None} - {f.prio for f in found if f.mark is not None})
            mark = catalog.mark_of(binding)
            if mark in present[place]:
                continue
            present[place].add(mark)
            program = self._program(binding)
            if binding.get("sink") == "ring":  # direct-action cls_bpf writing into the sink's ring (ringfilter.py)
                writers[mark] = self._load_ring_writer(binding, mark, loaded)
                request = tcnl.ring_filter_request(indexes[device], hook, prios[place], writers[mark].fileno(), mark, parent=_parent_number(parent), handle=tcnl.handle_for(mark))
            else:
                request = tcnl.mirror_filter_request(indexes[device], hook, prios[place], program, indexes[binding.get("to")], mark, parent=_parent_number(parent), handle=tcnl.handle_for(mark))
            requests.append((request, RTM_NEWTFILTER, CREATE))
            pending.append(binding)
        failures = self.nl.requests(requests)
        taken = [i for i, failure in enumerate(failures) if failure is not None and failure.code == errno.EEXIST]
        if taken:  # another filter of ours there has that handle (four bytes of two digests alike): the kernel picks one
            again = self.nl.requests([(tcnl.without_handle(requests[i][0]), RTM_NEWTFILTER, CREATE) for i in taken])
            for i, failure in zip(taken, again):
                failures[i] = failure
        done.extend(b for b, failure in zip(pending, failures) if failure is None)
        for binding, failure in zip(pending, failures):
            if failure is not None:
                raise OperationFailed(f"{binding.key}: the kernel refused the filter: {failure}")
        if writers:
            self._pin_ring_writers(writers)

    def _pin_ring_writers(self, writers: dict) -> None:
        """Pin the ring writers' programs (ringfilter.py says why), after their filters are in place."""
        from vtap_drivers.linux import ringfilter, tcxmirror

        directory = tcxmirror.pin_dir(self.netns)
        try:
            tcxmirror._private_dir(directory)
            for mark, prog in writers.items():
                ringfilter.pin(prog, directory, mark)
        except OSError as exc:
            raise OperationFailed(f"cannot pin a ring writer in {directory}: {exc.strerror or exc}") from None

    def _load_ring_writer(self, binding: Binding, mark: bytes, loaded: ExitStack):
        """Load a datapath=tc ring writer for this mirror (open until `loaded` closes); its program."""
        from vtap_drivers.linux import tcxprog

        try:
            ring = loaded.enter_context(self._ring_action(binding))
            return loaded.enter_context(tcxprog.load_mirror(self._program(binding), 0, mark.hex()[-10:], ring=ring)).prog
        except OSError as exc:
            raise OperationFailed(f"{binding.key}: cannot load the filter's ring writer: {exc.strerror or exc}") from None

    def _attach_tcx(self, bindings: list[Binding], indexes: dict, catalog: Catalog, done: list) -> None:
        from vtap_drivers.linux import tcxmirror

        present: dict[bytes, list] = {}
        for pinned in tcxmirror.pins(self.netns, catalog.owns):  # one listdir for the lot
            present.setdefault(pinned.mark, []).append(pinned)
        with tcxmirror.in_netns(self.netns):
            for binding in bindings:
                mark = catalog.mark_of(binding)
                try:
                    with self._ring_action(binding) as ring:
                        tcxmirror.attach(self.netns, mark, self._program(binding), indexes[binding.get("device")], binding.get("hook"), indexes[binding.get("to")], present.get(mark, []), ring=ring)
                except OSError as exc:
                    raise OperationFailed(f"{binding.key}: cannot put the tcx mirror in place: {exc.strerror or exc}") from None
                done.append(binding)

    @contextmanager
    def _ring_action(self, binding: Binding):
        """For a mirror to a pcap sink's ring: the RingAction its program needs (the ring open meanwhile); else None."""
        from vtap_drivers.linux import bpfring, bpfsys, tcxprog

        if binding.get("sink") != "ring":
            yield None
            return
        path = self._sink_ring(binding.get("to"))
        if path is None:
            raise OperationFailed(f"{binding.key}: sink {binding.get('to')} has no BPF ring on this data path")
        try:
            ring = bpfsys.get_pinned(path)
        except FileNotFoundError:
            raise OperationFailed(f"{binding.key}: sink {binding.get('to')} has no BPF ring at {path}; reconcile again") from None
        direction = bpfring.DIRECTION_IN if binding.get("hook") == "ingress" else bpfring.DIRECTION_OUT
        with ring:
            yield tcxprog.RingAction(ring.fileno(), binding.get("snaplen"), direction)

    @staticmethod
    def _check_placement(binding: Binding, place: dict) -> None:
        """The device's qdiscs still put this binding's filter where its plan said (they may change between)."""
        device, hook = binding.get("device"), binding.get("hook")
        try:
            wanted = placement(device, hook, place.get("hook"), lambda: place.get("root"))
        except ValidationError as exc:
            raise OperationFailed(f"{binding.key}: {exc.rule}") from None
        if wanted != binding.get("parent"):
            raise OperationFailed(f"{binding.key}: the qdiscs of {device} changed since it was planned; reconcile again")

    def _ensure_device(self, binding: Binding, kind: str, create, done: list) -> None:
        """A vtap-owned device with this binding's mark, up; replaced when its mark differs."""
        name = binding.get("device")
        alias = self.catalog.alias_of(binding)
        link = self._link(name=name)
        if link is not None:
            if link["alias"] == alias and link["kind"] == kind:
                if not link["flags"] & IFF_UP:
                    self.ipr.link("set", index=link["index"], state="up")
                return
            if not self.catalog.owns(mark_from_alias(link["alias"])):
                raise OperationFailed(f"device {name} exists and is not this vtap's (state dir {self.state_dir}); remove or rename it")
            self.ipr.link("del", index=link["index"])  # an older spec of ours
        try:
            create(name)
            done.append(binding)
            # No IPv6 address on it, or it sends router solicitations of its own into the pcap file or tunnel.
            self.ipr.link("set", ifname=name, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]})
            self.ipr.link("set", ifname=name, ifalias=alias, state="up")
        except _netlink_error() as exc:
            if binding.get("type") == "vxlan" and exc.code == errno.EEXIST:
                raise OperationFailed(
                    f"vxlan target vni {binding.get('vni')} port {binding.get('port')}: another VXLAN device here already uses that VNI and port"
                ) from None
            if binding.get("type") == "vxlan" and exc.code == errno.EADDRINUSE:
                # A VXLAN device listens on its port too: a collector on this same host holds it.
                raise OperationFailed(f"vxlan target port {binding.get('port')}: the UDP port is in use on this host, and a VXLAN device needs it") from None
            raise OperationFailed(f"cannot create {kind} device {name}: {os.strerror(exc.code)}") from None

    def _ensure_vxlan(self, binding: Binding, done: list) -> None:
        remote = binding.get("remote")
        group = "vxlan_group6" if ":" in remote else "vxlan_group"

        local = {("vxlan_local6" if ":" in remote else "vxlan_local"): binding.get("local")} if binding.get("local") else {}

        def create(name):
            self.ipr.link("add", ifname=name, kind="vxlan", vxlan_id=binding.get("vni"), vxlan_port=binding.get("port"), vxlan_learning=0, **{group: remote}, **local)

        self._ensure_device(binding, "vxlan", create, done)

    def _ensure_gre(self, binding: Binding, done: list) -> None:
        from vtap_drivers.linux.grenl import new_link_request

        def create(name):
            body = new_link_request(name, binding.get("kind"), binding.get("remote"), binding.get("local"), binding.get("key"), binding.get("version"), binding.get("direction"))
            (failure,) = self.nl.requests([(body, RTM_NEWLINK, CREATE)])
            if failure is not None:
                raise _netlink_error()(failure.code, failure.text)

        self._ensure_device(binding, binding.get("kind"), create, done)

    def _ensure_capture(self, binding: Binding, done: list) -> None:
        from vtap_drivers.linux.capture import start_capture_process

        self._ensure_device(binding, "ifb", lambda name: self.ipr.link("add", ifname=name, kind="ifb"), done)
        device = binding.get("device")
        # No queue on the sink: an ifb's default one holds 32 frames and drops the rest silently;
        # without it each copy goes straight to the capture's ring, whose drops are counted.
        self.ipr.tc("replace", kind="noqueue", index=self.ipr.link_lookup(ifname=device)[0], handle=0, parent=TC_H_ROOT)
        ring = self._sink_ring(device)
        if ring is not None:  # datapath=tcx: mirrors to this sink write here, with no clone (bpfring.py)
            from vtap_drivers.linux import bpfring, tcxmirror

            try:
                tcxmirror._private_dir(os.path.dirname(ring))
                bpfring.ensure(ring)
            except OSError as exc:
                raise OperationFailed(f"{binding.key}: cannot make the sink's BPF ring at {ring}: {exc.strerror or exc}") from None
        start_capture_process(device, device, binding.get("path"), binding.get("snaplen"), self.netns, self.state_dir, binding.get("max_size"), binding.get("max_files"), ring)

    # ------------------------------------------------------------ remove

    def remove(self, bindings) -> None:
        bindings = sorted(unique(bindings), key=lambda b: -b.order)
        with self._changing(), self._kernel(), self.catalog.locked() as catalog:
            self._remove(bindings, catalog)
            self._forget_what_is_gone(catalog)
            catalog.save_or_keep()

    def _real_mark(self, binding: Binding) -> bytes:
        """The mark a binding has in the kernel: its own, or the one observe() found on it."""
        found = binding.get("mark")
        return bytes.fromhex(found) if found else self.catalog.mark_of(binding)

    def _forget_what_is_gone(self, catalog: Catalog) -> None:
        """Catalog entries of devices that no longer exist name nothing in the kernel: drop them."""
        links = self._link_indexes()  # names and indexes only: every apply and remove reads them
        indexes, names = set(links.values()), set(links)
        for mark, binding, ifindex in list(catalog.entries()):
            if (ifindex is not None and ifindex not in indexes) or (binding.get("type") != "mirror" and binding.get("device") not in names):
                catalog.forget(mark)
        for device, ifindex in list(catalog.qdiscs.items()):
            if ifindex not in indexes:
                catalog.qdiscs.pop(device)

    def _remove(self, bindings, catalog: Catalog) -> None:
        mirrors = [b for b in bindings if b.get("type") == "mirror"]
        unknown_marks = {bytes.fromhex(b.get("mark")) for b in bindings if b.get("type") == "unknown" and not b.get("device")}
        if mirrors:
            self._remove_mirrors(mirrors, catalog)
        if unknown_marks:
            self._remove_unknown_filters(unknown_marks, catalog)
        if mirrors or unknown_marks:
            self._wait_released({self._real_mark(b) for b in mirrors} | unknown_marks)
            self._unpin_ring_writers({self._real_mark(b) for b in mirrors if b.get("sink") == "ring"} | unknown_marks)
        for binding in bindings:
            kind = binding.get("type")
            if kind in ("vxlan", "capture", "gre", "erspan") or (kind == "unknown" and binding.get("device")):
                self._remove_device(binding)
            if kind == "ring":
                self._remove_ring(binding.get("device"))
            elif kind == "clsact":
                self._drop_clsact_if_unused(binding.get("ifindex"), binding.get("device"), catalog)
            elif kind != "unknown":
                catalog.forget(self._real_mark(binding))

    def _unpin_ring_writers(self, marks: set) -> None:
        """Drop the pins of these marks' ring writers (datapath=tc), after their filters went."""
        from vtap_drivers.linux import ringfilter, tcxmirror

        if marks:
            ringfilter.unpin(tcxmirror.pin_dir(self.netns), marks)

    def _remove_mirrors(self, bindings: list[Binding], catalog: Catalog) -> None:
        on_tcx = {self._real_mark(b) for b in bindings if b.get("datapath") == "tcx"}
        if on_tcx:
            self._detach_tcx(on_tcx)
            bindings = [b for b in bindings if b.get("datapath") != "tcx"]
            if not bindings:
                return
        indexes = self._indexes({b.get("device") for b in bindings})
        wanted: dict[tuple, set] = {}
        for binding in bindings:
            device = binding.get("device")
            if device not in indexes:
                catalog.qdiscs.pop(device, None)
                continue  # the device is gone, and its filters with it
            wanted.setdefault((indexes[device], binding.get("hook"), binding.get("parent")), set()).add(self._real_mark(binding))
        self._delete_filters(wanted)
        for device in {b.get("device") for b in bindings} & indexes.keys():
            self._drop_clsact_if_unused(indexes[device], device, catalog)

    def _delete_filters(self, wanted: dict) -> set:
        """Delete the filters with these marks: {(ifindex, hook, parent): marks}. Returns the ifindexes touched."""
        requests, touched = [], set()
        for (ifindex, hook, parent), marks in wanted.items():
            for found in self._filters(ifindex, hook, parent):
                if found.mark in marks:
                    query = tcnl.filter_query(ifindex, hook, found.prio, found.handle, parent=_parent_number(parent))
                    requests.append((query, RTM_DELTFILTER, REQUEST))
                    touched.add(ifindex)
        for failure in self.nl.requests(requests):
            if failure is not None and failure.code not in (errno.ENOENT, errno.EINVAL):
                raise OperationFailed(f"cannot delete a vtap filter: {failure}")
        return touched

    def _wait_released(self, marks: set) -> None:
        """Wait until the kernel has let go of deleted filters' actions.

        cls_bpf frees a deleted filter's actions after an RCU grace period; until
        then the action dump (how orphans without a catalog entry are found)
        still lists them.
        """
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while marks & self._mirred_marks() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _drop_clsact_if_unused(self, ifindex: int, device: str, catalog: Catalog) -> None:
        """Remove the clsact vtap added on this device once nothing (of anyone's) is left on it."""
        if catalog.qdiscs.get(device) != ifindex:
            catalog.qdiscs.pop(device, None)  # not ours, or made on a device of the same name that is gone
            return
        if any(self._filters(ifindex, hook) for hook in HOOKS):
            return
        (failure,) = self.nl.requests([(tcnl.qdisc_request(ifindex), RTM_DELQDISC, REQUEST)])
        if failure is not None and failure.code not in (errno.ENOENT, errno.EINVAL):
            raise OperationFailed(f"interface {device}: cannot remove vtap's clsact qdisc: {failure}")
        catalog.qdiscs.pop(device, None)

    def _detach_tcx(self, marks: set) -> None:
        from vtap_drivers.linux import tcxmirror

        with tcxmirror.in_netns(self.netns):
            try:
                tcxmirror.remove_marks(self.netns, marks)
            except OSError as exc:
                raise OperationFailed(f"cannot remove a vtap tcx mirror: {exc.strerror or exc}") from None

    def _remove_unknown_filters(self, marks: set, catalog: Catalog) -> None:
        """Find uncatalogued marks: look at every device's hooks (rare, slow path)."""
        self._detach_tcx(marks)
        links = self._links()
        places = {(link["index"], hook, None): marks for link in links for hook in HOOKS}
        for ifindex, qdiscs in self._qdisc_places().items():
            if qdiscs["root"] and qdiscs["root"]["kind"] in FILTERABLE_ROOTS:
                places[ifindex, "egress", tcnl.format_handle(qdiscs["root"]["handle"])] = marks
        touched = self._delete_filters(places)
        for link in links:
            if link["index"] in touched:
                self._drop_clsact_if_unused(link["index"], link["name"], catalog)

    def _remove_device(self, binding: Binding) -> None:
        name = binding.get("device")
        wanted = self._real_mark(binding)
        if binding.get("type") == "capture" or name.startswith(SINK_PREFIX):
            from vtap_drivers.linux.capture import stop_capture_process

            stop_capture_process(name, self.state_dir)  # it has read what the ring held
            self._remove_ring(name)
        link = self._link(name=name)
        if link is None or mark_from_alias(link["alias"]) != wanted:
            return  # gone, someone else's, or a newer spec of ours
        try:
            self.ipr.link("del", index=link["index"])
        except _netlink_error() as exc:
            if exc.code != errno.ENODEV:
                raise

    def _remove_ring(self, sink: str) -> None:
        """Unpin a sink's BPF ring (the mirrors writing to it are gone or go now; their fds free it)."""
        from vtap_drivers.linux import bpfring, tcxmirror

        bpfring.remove(bpfring.ring_path(tcxmirror.pin_dir(self.netns), sink))


PLACE_OF_PARENT = {tcnl.TC_H_CLSACT: 0, tcnl.TC_H_ROOT: 1}  # where a qdisc sits: [hook, root]


def _parent_number(parent: str | None) -> int | None:
    return tcnl.parse_handle(parent) if parent else None


def missing_tunnel_device(target) -> str | None:
    """Why this kernel cannot make the device a gre:/erspan: target needs (None: it can, or not a GRE target)."""
    if target.kind not in ("gre", "erspan"):
        return None
    from vtap_drivers.linux import grenl

    kind = grenl.kind_for(target.kind, resolve_host(target.host))
    if grenl.kernel_has(kind):
        return None
    return f"this kernel has no {kind} devices (module {grenl.MODULES[kind]}); use vxlan://"


def _check_local(remote: str, local: str | None) -> None:
    if local and ipaddress.ip_address(local).version != ipaddress.ip_address(remote).version:
        raise ValidationError("target local", f"{local} and the remote end {remote} are not of one IP family")


def _with_ring_drops(devices: list[Binding], mirrors: list[Binding]) -> list[Binding]:
    """A pcap sink's lost copies include those its tcx mirrors could not write into its full BPF ring
    (their third counter): the session's capture_dropped counts every copy that missed the file."""
    lost: dict[str, int] = {}
    for mirror in mirrors:
        if mirror.get("sink") == "ring" and mirror.counters is not None:
            lost[mirror.get("to")] = lost.get(mirror.get("to"), 0) + mirror.counters.dropped
    if not lost:
        return devices
    return [replace(b, counters=replace(b.counters, dropped=b.counters.dropped + lost.get(b.get("device"), 0))) if b.get("type") == "capture" and b.counters is not None else b for b in devices]


def _writes_ring(entry: dict) -> bool:
    """Whether a catalog entry of a mirror is a ring writer (its spec has ("sink", "ring"))."""
    return any(pair[0] == "sink" and pair[1] == "ring" for pair in entry["spec"])


def _drifted(binding: Binding, mark: bytes, **actual) -> Binding:
    """The binding as the kernel really holds it: some spec values differ, and the mark it carries."""
    spec = tuple((name, actual.get(name, value)) for name, value in binding.spec) + (("mark", mark.hex()),)
    return replace(binding, spec=spec)
