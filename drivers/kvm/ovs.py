"""The ovs backend: Open vSwitch Mirror rows (and tunnel ports) through ovsdbapp.

OVS allows at most 32 mirrors per bridge (MAX_MIRRORS in ofproto), so vtap
keeps one Mirror row per session and bridge that lists every source port of
that session there. OVS words, from the switch's point of view
(ovs-vswitchd.conf.db(5), Mirror table): select_src_port = packets arriving
at the bridge from the port = what the VM sends (`out`); select_dst_port =
packets departing to the port = what the VM receives (`in`).

A plan still has one Binding per flow and guest NIC (a "member" of the row):
the row's external_ids["vtap-members"] lists them (JSON), and observe() reports
a member only while the row really selects its port for its direction and
sends to its output, so status stays per flow. A row's statistics count the
whole session on that bridge: every member reports them (once per flow).
Deleting a Mirror means removing it from its bridge's `mirrors` column
(Mirror is not a root table: OVSDB then drops it).

OVS mirrors select whole ports: a pcap filter expression cannot be expressed
and is refused (use --backend tc). Sampling is refused too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from vtap_core.driver import Binding, Counters
from vtap_core.errors import OperationFailed, TemporaryError

log = logging.getLogger("vtap.kvm.ovs")
CFG_TIMEOUT = 5.0  # seconds vswitchd gets to apply a change before flows are purged anyway

MARK = "vtap-binding"  # tunnel ports (and one Mirror per flow, as vtap made them before)
MEMBERS = "vtap-members"
MIRROR = "vtap-mirror"
MAX_MIRRORS = 32  # per bridge, a compile-time limit of ofproto (ofproto/ofproto-dpif-mirror.h)
DEFAULT_REMOTE = "unix:/run/openvswitch/db.sock"
TUNNEL_TYPES = {"gre", "erspan", "vxlan"}


def tunnel_port_name(session: str, bridge: str) -> str:
    """A port name unique per session and bridge, within IFNAMSIZ."""
    return "vtap" + hashlib.sha256(f"{session}/{bridge}".encode()).hexdigest()[:10]


def tunnel_options(target) -> dict:
    """OVS Interface type and options for a tunnel target (vswitchd.conf.db(5), Interface table)."""
    options = {"remote_ip": target.host}
    if getattr(target, "local", None):
        options["local_ip"] = target.local
    if target.kind == "vxlan":
        options.update(key=str(target.vni), dst_port=str(target.udp_port))
    elif target.kind == "gre":
        if target.key is not None:
            options["key"] = str(target.key)
    else:
        # vtap says ERSPAN type II or III; OVS numbers them erspan_ver 1 and 2. key = session id.
        options.update(erspan_ver=str(target.version - 1), key=str(target.erspan_id))
    return options


def tunnel_binding(session: str, bridge: str, target) -> Binding:
    options = ",".join(f"{k}={v}" for k, v in sorted(tunnel_options(target).items()))
    spec = (("backend", "ovs"), ("bridge", bridge), ("port", tunnel_port_name(session, bridge)), ("type", target.kind), ("options", options))
    return Binding(key=f"ovs/{bridge}/tunnel/{session}", session=session, spec=spec, order=0)


def mirror_binding(session: str, flow: str, vm: str, bridge: str, device: str, direction: str, output: str, snaplen) -> Binding:
    spec = (("backend", "ovs"), ("bridge", bridge), ("device", device), ("direction", direction), ("output", output))
    if snaplen is not None:
        spec += (("snaplen", int(snaplen)),)
    return Binding(key=f"ovs/{bridge}/{device}/{session}/{flow}", session=session, flow=flow, vm=vm, spec=spec)


def _encode(binding: Binding) -> str:
    return json.dumps({"key": binding.key, "session": binding.session, "flow": binding.flow, "vm": binding.vm, "spec": binding.spec, "order": binding.order})


def _decode(text: str, counters=None) -> Binding:
    data = json.loads(text)
    spec = tuple(tuple(pair) for pair in data["spec"])
    return Binding(key=data["key"], session=data["session"], flow=data["flow"], vm=data["vm"], spec=spec, order=data["order"], counters=counters)


def _spec(member: dict, name: str):
    return dict(member["spec"]).get(name)


def _members_observed(bridge: str, mirror) -> list[Binding]:
    """The members a vtap Mirror row really realizes, as Bindings; counters once per flow."""
    src = {p.name for p in mirror.select_src_port}
    dst = {p.name for p in mirror.select_dst_port}
    output = mirror.output_port[0].name if mirror.output_port else None
    snaplen = mirror.snaplen[0] if mirror.snaplen else None
    stats = mirror.statistics
    counters = Counters(packets=int(stats.get("tx_packets", 0)), bytes=int(stats.get("tx_bytes", 0)))
    found, counted = [], set()
    for member in json.loads(mirror.external_ids[MEMBERS]):
        device, direction = _spec(member, "device"), _spec(member, "direction")
        wanted = {"out": (src,), "in": (dst,), "both": (src, dst)}.get(direction, ())
        selected = bool(wanted) and all(device in ports for ports in wanted)
        binding = mirror_binding(member["session"], member["flow"], member["vm"], bridge, device,
                                 direction if selected else "not selected", output or "none", snaplen)
        found.append(Binding(binding.key, binding.session, binding.flow, binding.vm, binding.spec,
                             counters=None if binding.flow in counted else counters))
        counted.add(binding.flow)
    return found


class Ovs:
    """A connection to ovsdb-server (opened on first use) and the rows vtap keeps there."""

    def __init__(self, remote: str | None = None):
        self.remote = remote or DEFAULT_REMOTE
        self._api = None

    @property
    def api(self):
        if self._api is None:
            from ovsdbapp.backend.ovs_idl import connection
            from ovsdbapp.schema.open_vswitch import impl_idl

            try:
                idl = connection.OvsdbIdl.from_server(self.remote, "Open_vSwitch")
                self._api = impl_idl.OvsdbIdl(connection.Connection(idl=idl, timeout=10))
            except Exception as exc:
                raise TemporaryError(f"cannot connect to Open vSwitch at {self.remote}: {exc}") from None
        return self._api

    def available(self) -> bool:
        if self._api is None and self.remote.startswith("unix:") and not os.path.exists(self.remote[5:]):
            return False  # no Open vSwitch on this host: don't try (and log) a connection each time
        try:
            self.api
            return True
        except TemporaryError:
            return False

    def port_names(self) -> set[str]:
        return {port.name for port in self._rows("Port")}

    def bridge_of(self, port: str) -> str | None:
        """The bridge a port (e.g. a guest's vnetN) is on, or None."""
        for bridge in self._rows("Bridge"):
            if any(p.name == port for p in bridge.ports):
                return bridge.name
        return None

    # observe / apply / remove ------------------------------------------------

    def observe(self) -> list[Binding]:
        found = []
        for bridge in self._rows("Bridge"):
            for mirror in list(bridge.mirrors):
                if MEMBERS in mirror.external_ids:
                    found.extend(_members_observed(bridge.name, mirror))
                elif MARK in mirror.external_ids:  # one row per flow, from an older vtap: reported so it is replaced
                    found.append(_decode(mirror.external_ids[MARK]))
        for iface in self._rows("Interface"):
            if MARK in iface.external_ids:
                found.append(_decode(iface.external_ids[MARK]))
        return found

    def mirror_use(self) -> dict[str, tuple[int, set[str]]]:
        """Per bridge: (mirrors that are not vtap's, sessions that have a vtap Mirror there)."""
        use = {}
        for bridge in self._rows("Bridge"):
            foreign, sessions = 0, set()
            for mirror in list(bridge.mirrors):
                if MIRROR in mirror.external_ids:
                    sessions.add(json.loads(mirror.external_ids[MIRROR])["session"])
                elif MARK in mirror.external_ids:
                    sessions.add(json.loads(mirror.external_ids[MARK])["session"])
                else:
                    foreign += 1
            use[bridge.name] = (foreign, sessions)
        return use

    def apply(self, binding: Binding) -> None:
        if "/tunnel/" in binding.key:
            self._add_tunnel(binding)
        else:
            self._update_mirror(binding.session, binding.get("bridge"), add=binding)
            self._refresh_flows()

    def remove(self, binding: Binding) -> None:
        if "/tunnel/" in binding.key:
            self.api.del_port(binding.get("port"), if_exists=True).execute(check_error=True)
            return
        for bridge in self._rows("Bridge"):
            for mirror in list(bridge.mirrors):
                if MARK in mirror.external_ids and json.loads(mirror.external_ids[MARK])["key"] == binding.key:
                    self.api.db_remove("Bridge", bridge.uuid, "mirrors", mirror.uuid).execute(check_error=True)
        self._update_mirror(binding.session, binding.get("bridge"), drop=binding.key)
        self._refresh_flows()

    def _refresh_flows(self) -> None:
        """Cached datapath flows do not see a changed Mirror (ovsflows.py): have vswitchd drop them."""
        from vtap_drivers.kvm.ovsflows import purge_datapath_flows

        # vswitchd must have applied the new row first: bump next_cfg and wait until cur_cfg reaches it
        # (what ovs-vsctl does without --no-wait), then purge.
        (row,) = self._rows("Open_vSwitch")
        wanted = row.next_cfg + 1
        self.api.db_set("Open_vSwitch", row.uuid, ("next_cfg", wanted)).execute(check_error=True)
        deadline = time.monotonic() + CFG_TIMEOUT
        while self._rows("Open_vSwitch")[0].cur_cfg < wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        problem = purge_datapath_flows(self.remote)
        if problem:
            log.warning("mirror changed; cached datapath flows may not see it yet: %s", problem)

    def _rows(self, table: str) -> list:
        """A snapshot: ovsdbapp's thread updates the IDL while we read it."""
        return list(self.api.tables[table].rows.values())

    def _mirror(self, session: str, bridge: str):
        """vtap's Mirror row of this session on this bridge, or None."""
        for row in self._rows("Bridge"):
            if row.name == bridge:
                for mirror in list(row.mirrors):
                    if json.loads(mirror.external_ids.get(MIRROR, "{}")).get("session") == session:
                        return row, mirror
                return row, None
        return None, None

    def _update_mirror(self, session: str, bridge: str, add: Binding | None = None, drop: str | None = None) -> None:
        """Rewrite the session's Mirror on this bridge from its members (plus `add`, minus `drop`)."""
        bridge_row, mirror = self._mirror(session, bridge)
        if bridge_row is None:
            return
        members = json.loads(mirror.external_ids[MEMBERS]) if mirror is not None else []
        gone = {drop, add.key if add else None}
        members = [m for m in members if m["key"] not in gone] + ([json.loads(_encode(add))] if add else [])
        ports = {p.name: p.uuid for p in self._rows("Port")}
        if add is not None:
            for name in (add.get("device"), add.get("output")):
                if name not in ports:
                    raise OperationFailed(f"Open vSwitch has no port {name!r}")
        present = [m for m in members if _spec(m, "device") in ports]
        if not present:
            if mirror is not None:  # a Mirror that selects no port must not linger
                self.api.db_remove("Bridge", bridge_row.uuid, "mirrors", mirror.uuid).execute(check_error=True)
            return
        newest = json.loads(_encode(add)) if add else present[-1]  # output and snaplen are the session's
        columns = {
            "select_src_port": sorted({ports[_spec(m, "device")] for m in present if _spec(m, "direction") in ("out", "both")}),
            "select_dst_port": sorted({ports[_spec(m, "device")] for m in present if _spec(m, "direction") in ("in", "both")}),
            "snaplen": [_spec(newest, "snaplen")] if _spec(newest, "snaplen") is not None else [],
            "external_ids": {MIRROR: json.dumps({"session": session, "bridge": bridge}), MEMBERS: json.dumps(members)},
        }
        output = ports.get(_spec(newest, "output"))
        if output is None:
            raise OperationFailed(f"Open vSwitch has no port {_spec(newest, 'output')!r}")
        if mirror is not None:
            self.api.db_set("Mirror", mirror.uuid, ("output_port", output), *columns.items()).execute(check_error=True)
            return
        if len(bridge_row.mirrors) >= MAX_MIRRORS:
            # plan() refuses this; reached only when two changes race: leave it missing, not half made.
            log.warning("bridge %s has %d mirrors, the most Open vSwitch allows: session %s not mirrored there", bridge, MAX_MIRRORS, session)
            return
        name = "vtap-" + hashlib.sha256(f"{session}/{bridge}".encode()).hexdigest()[:12]
        with self.api.transaction(check_error=True) as txn:
            row = txn.add(self.api.db_create("Mirror", name=name, output_port=output, **columns))
            txn.add(self.api.db_add("Bridge", bridge_row.uuid, "mirrors", row))

    def _add_tunnel(self, binding: Binding) -> None:
        options = dict(item.split("=", 1) for item in binding.get("options").split(","))
        name = binding.get("port")
        with self.api.transaction(check_error=True) as txn:
            txn.add(self.api.add_port(binding.get("bridge"), name, may_exist=True))
            txn.add(self.api.db_set("Interface", name, ("type", binding.get("type")), ("options", options), ("external_ids", {MARK: _encode(binding)})))

    def close(self):
        if self._api is not None:
            try:
                self._api.ovsdb_connection.stop()
            except Exception:
                pass
            self._api = None
