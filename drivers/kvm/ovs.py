"""The ovs backend: Open vSwitch Mirror rows (and tunnel ports) through ovsdbapp.

One Mirror row per flow and guest NIC, on the NIC's bridge. OVS words, from
the switch's point of view: select_src_port = packets the switch receives on
the port = what the VM sends (`out`); select_dst_port = packets the switch
sends to the port = what the VM receives (`in`).

Every row vtap creates carries its Binding in external_ids["vtap-binding"]
(JSON), so observe() rebuilds exactly what plan() produced, and orphans of a
crashed run are found and removed. Deleting a Mirror means removing it from
its bridge's `mirrors` column (Mirror is not a root table: OVSDB then drops it).

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

LOG = logging.getLogger("vtap.kvm.ovs")
CFG_TIMEOUT = 5.0  # seconds vswitchd gets to apply a change before flows are purged anyway

MARK = "vtap-binding"
DEFAULT_REMOTE = "unix:/run/openvswitch/db.sock"
SELECT = {"out": ("select_src_port",), "in": ("select_dst_port",), "both": ("select_src_port", "select_dst_port")}
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
                if MARK in mirror.external_ids:
                    stats = mirror.statistics
                    counters = Counters(packets=int(stats.get("tx_packets", 0)), bytes=int(stats.get("tx_bytes", 0)))
                    found.append(_decode(mirror.external_ids[MARK], counters))
        for iface in self._rows("Interface"):
            if MARK in iface.external_ids:
                found.append(_decode(iface.external_ids[MARK]))
        return found

    def apply(self, binding: Binding) -> None:
        if "/tunnel/" in binding.key:
            self._add_tunnel(binding)
        else:
            self._add_mirror(binding)
            self._refresh_flows()

    def remove(self, binding: Binding) -> None:
        if "/tunnel/" in binding.key:
            self.api.del_port(binding.get("port"), if_exists=True).execute(check_error=True)
            return
        doomed = [
            (bridge.uuid, mirror.uuid)
            for bridge in self._rows("Bridge")
            for mirror in list(bridge.mirrors)
            if MARK in mirror.external_ids and json.loads(mirror.external_ids[MARK])["key"] == binding.key
        ]
        for bridge, mirror in doomed:
            self.api.db_remove("Bridge", bridge, "mirrors", mirror).execute(check_error=True)
        if doomed:
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
            LOG.warning("mirror changed; cached datapath flows may not see it yet: %s", problem)

    def _rows(self, table: str) -> list:
        """A snapshot: ovsdbapp's thread updates the IDL while we read it."""
        return list(self.api.tables[table].rows.values())

    def _port(self, name: str):
        for port in self._rows("Port"):
            if port.name == name:
                return port
        raise OperationFailed(f"Open vSwitch has no port {name!r}")

    def _add_mirror(self, binding: Binding) -> None:
        self.remove(binding)  # replace, so apply stays idempotent
        device, output = self._port(binding.get("device")), self._port(binding.get("output"))
        columns = {name: [device.uuid] for name in SELECT[binding.get("direction")]}
        if binding.get("snaplen") is not None:
            columns["snaplen"] = binding.get("snaplen")
        name = "vtap-" + hashlib.sha256(binding.key.encode()).hexdigest()[:12]
        with self.api.transaction(check_error=True) as txn:
            mirror = txn.add(self.api.db_create("Mirror", name=name, output_port=output.uuid, external_ids={MARK: _encode(binding)}, **columns))
            txn.add(self.api.db_add("Bridge", binding.get("bridge"), "mirrors", mirror))

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
