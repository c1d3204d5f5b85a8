"""The linux driver: host interfaces as sources, mirrored with the tc dataplane.

Sources are interfaces of this host (`--interface IFNAME`), seen from the
interface's own point of view (`in` = what it receives, as tcpdump -Q in).
Targets: port:IFNAME (an existing interface), vxlan://HOST[:PORT]?vni=N (a
VXLAN device vtap creates), pcap:PATH (a sink device and a capture process).
gre:// and erspan:// need gretap/erspan devices, which this kernel lacks.

Settings: state_dir (always), netns (optional: every device lives in that
named network namespace; how the tests run), datapath (tc, the default:
clsact + cls_bpf + mirred; tcx: one eBPF program per mirror on the device's
tcx hook that filters and clones in one step, faster for small packets, on
Linux >= 6.6 and where the filter translates; elsewhere that mirror stays on
cls_bpf and the log says why once; tcxmirror.py).
"""

from __future__ import annotations

import select
import threading
import time
from typing import Iterable, Iterator

from vtap_core.driver import Binding, Description, Driver, Features
from vtap_core.errors import NotFound, Unsupported, ValidationError
from vtap_core.model import VM, TapFlow, TapSession

FEATURES = Features(
    targets=frozenset({"port", "vxlan", "pcap", "gre", "erspan"}),  # gre, erspan: where the kernel has the devices
    sources=frozenset({"interface"}),
    filter=True,
    sample=True,
    snaplen_targets=frozenset({"pcap"}),
)
WATCH_POLL = 0.5  # seconds between looks at the stop event while no link event arrives
# A change plans to validate, then at once again to reconcile the same state: within this many
# seconds the second plan is the first. Never longer: a plan also resolves tunnel hosts' names.
PLAN_REUSE_SECONDS = 1.0


class LinuxDriver(Driver):
    name = "linux"

    def __init__(self, state_dir: str = ".", netns: str | None = None, datapath: str | None = None, **options):
        from vtap_drivers.linux.tcxmirror import check_datapath

        super().__init__(state_dir=state_dir, netns=netns, **options)
        self.state_dir = state_dir
        self.netns = netns or None
        self.datapath = check_datapath(datapath)
        self._dataplane = None
        self._last_plan = None  # (when, (sessions, flows, devices present), bindings)

    @property
    def dataplane(self):
        if self._dataplane is None:
            from vtap_drivers.linux.dataplane import TcDataplane

            self._dataplane = TcDataplane(netns=self.netns, state_dir=self.state_dir, datapath=self.datapath)
        return self._dataplane

    def describe(self) -> Description:
        connection = {"netns": self.netns} if self.netns else {"host": "this host"}
        return Description(self.name, "host interfaces of this Linux host, mirrored with tc (cls_bpf + mirred)", FEATURES, connection)

    def inventory(self) -> list[VM]:
        return []  # host interfaces are not VMs; `--interface` names them directly

    def plan(self, sessions: Iterable[TapSession], flows: Iterable[TapFlow]) -> list[Binding]:
        from vtap_drivers.linux.dataplane import missing_tunnel_device, unique

        sessions, flows = list(sessions), list(flows)
        known = {s.name for s in sessions}
        members: dict[str, list] = {}
        for flow in flows:
            if flow.session not in known:
                raise NotFound(f"session {flow.session}: no such session")
            members.setdefault(flow.session, []).append(flow)
        for session in sessions:
            missing = missing_tunnel_device(session.target)
            if missing:
                raise Unsupported(self.name, f"target {session.target.kind}:", missing)
            self.check_features(session, members.get(session.name, []))
        devices = {f.source.interface for f in flows if f.source.interface} | {s.target.port for s in sessions if s.target.kind == "port"}
        with self.dataplane.planning(devices) as present:
            # None for a plan of a few devices, or in one_look() (status, a reconcile: an observe of the
            # same moment follows, never a second plan): nothing to reuse, nothing to keep.
            view = None if self.dataplane.look_open() else self.dataplane.planning_view()
            asked = (sessions, flows, view)
            last = self._last_plan
            if view is not None and last is not None and time.monotonic() - last[0] < PLAN_REUSE_SECONDS and last[1] == asked:
                return list(last[2])
            bindings: list[Binding] = []
            tunnels: dict[tuple, str] = {}
            for session in sessions:
                if session.target.kind == "port" and session.target.port not in present:
                    raise NotFound(f"target: interface {session.target.port} does not exist{self._where()}")
                if session.target.kind == "vxlan":
                    self._check_tunnel_free(session, tunnels)
                bindings.extend(self.dataplane.session_target(session)[0])
                for flow in members.get(session.name, []):
                    if flow.source.interface not in present:
                        raise NotFound(f"interface {flow.source.interface}: no such interface{self._where()}")
                    bindings.extend(self.dataplane.plan_interface(session, flow))
        bindings = unique(bindings)
        if view is not None:
            self._last_plan = (time.monotonic(), asked, bindings)
        return list(bindings)

    def _check_tunnel_free(self, session: TapSession, tunnels: dict) -> None:
        # The kernel allows one VXLAN device per VNI and UDP port in a namespace.
        slot = (session.target.vni, session.target.udp_port)
        if slot in tunnels:
            raise ValidationError("target", f"vni {slot[0]} on UDP port {slot[1]} is already the target of session {tunnels[slot]} (one session per VNI and port on a host)")
        tunnels[slot] = session.name

    def _where(self) -> str:
        return f" in netns {self.netns}" if self.netns else ""

    def observe(self) -> list[Binding]:
        return self.dataplane.observe()

    def one_look(self):
        """Plan and observe inside read the namespace's links and qdiscs once (reconcile.one_look)."""
        return self.dataplane.one_look()

    def prepare(self, bindings: Iterable[Binding]) -> None:
        self.dataplane.prepare(bindings)

    def apply(self, bindings: Iterable[Binding]) -> None:
        self.dataplane.apply(bindings)

    def remove(self, bindings: Iterable[Binding]) -> None:
        self.dataplane.remove(bindings)

    def apply_problems(self) -> list[tuple]:
        return self.dataplane.apply_failures()

    def watch(self, stop: threading.Event) -> Iterator[str | None]:
        """A hint (None: look at everything) whenever a device appears, goes or changes."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        events = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        try:
            events.bind(groups=RTMGRP_LINK)
            while not stop.is_set():
                readable, _, _ = select.select([events.fileno()], [], [], WATCH_POLL)
                if readable and events.get():
                    yield None
        finally:
            events.close()

    def close(self) -> None:
        if self._dataplane is not None:
            self._dataplane.close()
            self._dataplane = None
