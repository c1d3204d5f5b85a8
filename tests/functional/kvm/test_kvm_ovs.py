"""The ovs backend: a guest NIC on an Open vSwitch bridge (userspace datapath),
mirrored by an OVS Mirror row; copies counted on the output port; the row goes
away with the session."""

import json
import os

import pytest

from .kvm_lab import host_devices, wait_for, wait_sending
from . import kvm_lab as lab


def vtap_mirrors(ovs):
    rows = json.loads(ovs.vsctl("--format=json", "--columns=name,external_ids,select_src_port,select_dst_port", "list", "Mirror"))
    return [row for row in rows["data"] if "vtap-mirror" in json.dumps(row)]


def test_ovs_mirror_counts_guest_frames_and_goes_away(libvirt_host, ovs, ovs_lan, guests, tmp_path):
    from vtap_core.client import Client

    dom, (mac,) = guests.start(ovs_lan, 10, ovs=True)
    (device,) = host_devices(dom)
    assert ovs.vsctl("port-to-br", device) == ovs_lan.bridge
    with Client(driver="kvm", state=str(tmp_path / "vtap.db"), uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        # Tapped while the guest boots: OVS 3.1's userspace datapath does not re-translate a flow it
        # already caches when a Mirror is added (see drivers/kvm/README.md, known limits).
        vtap.create_session("ovsmon", to=f"port:{ovs_lan.monitor}", backend="ovs", snaplen=64)
        vtap.add_flow("ovsmon", vm=dom.UUIDString(), direction="out")
        (row,) = vtap_mirrors(ovs)
        assert row  # one Mirror row, marked
        wait_sending(device)
        counts = lab.count_frames(ovs_lan.counter, mac, 30, until=("ipv4_out", 5))
        # The guest pings every ~0.2 s: its requests are copied; what it receives is not (direction out).
        assert counts["ipv4_out"] >= 5, counts
        assert counts["in"] == 0, counts
        assert counts["longest"] == 64, counts  # echo requests are 98 bytes: cut to the snaplen
        status = {row.flow: row for row in vtap.status()}
        assert status["ovsmon-1"].state == "active"

        # The VM stops: libvirt deletes its port, and the next reconcile (the follower's) drops the stale Mirror.
        dom.destroy()
        vtap.reconcile()
        assert vtap_mirrors(ovs) == []
        dom.create()
        vtap.reconcile()
        (row,) = vtap_mirrors(ovs)
        assert host_devices(dom)[0] in json.dumps(row)

        vtap.delete_session("ovsmon")
        assert vtap_mirrors(ovs) == []
        # vswitchd revalidates its datapath flows in the background: copies stop within a moment.
        wait_for(lambda: lab.count_frames(ovs_lan.counter, mac, 1.0)["out"] == 0, 10, "copies to stop")


def test_ovs_backend_refuses_filters_and_changes_nothing(libvirt_host, ovs, ovs_lan, guests, tmp_path):
    from vtap_core.client import Client
    from vtap_core.errors import Unsupported

    dom, _ = guests.start(ovs_lan, 11, ovs=True)
    with Client(driver="kvm", state=str(tmp_path / "vtap.db"), uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        vtap.create_session("ovsf", to=f"port:{ovs_lan.monitor}", backend="ovs")
        with pytest.raises(Unsupported, match="filter expressions with backend ovs"):
            vtap.add_flow("ovsf", vm=dom.name(), filter="icmp")
        assert vtap.flows() == []
        assert vtap_mirrors(ovs) == []


@pytest.mark.parametrize(
    "target, kind, options",
    [
        ("gre://{peer}?key=7", "gre", {"key": "7"}),
        ("erspan://{peer}?version=3&id=5", "erspan", {"erspan_ver": "2", "key": "5"}),
    ],
)
def test_ovs_tunnel_target_is_a_tunnel_port(libvirt_host, ovs, ovs_lan, guests, tmp_path, target, kind, options):
    """gre/erspan targets (no such kernel devices here) are OVS tunnel ports, chosen automatically."""
    from vtap_core.client import Client

    dom, _ = guests.start(ovs_lan, 12, ovs=True)
    target = target.format(peer=ovs_lan.ip(1))  # the lab's peer: nothing leaves this machine
    with Client(driver="kvm", state=str(tmp_path / "vtap.db"), uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        vtap.create_session("tun", to=target)
        vtap.add_flow("tun", vm=dom.UUIDString())
        rows = json.loads(ovs.vsctl("--format=json", "--columns=name,type,options,error", "find", "Interface", f"type={kind}"))["data"]
        (name, _, (_, opts), error) = rows[0]
        assert dict(opts) == {"remote_ip": ovs_lan.ip(1), **options}
        assert error == ["set", []], error  # vswitchd accepted it
        (mirror,) = vtap_mirrors(ovs)
        assert ovs.vsctl("get", "Mirror", mirror[0], "output_port") == ovs.vsctl("get", "Port", name, "_uuid")
        vtap.delete_session("tun")
        assert vtap_mirrors(ovs) == []
        assert ovs.vsctl("--columns=name", "find", "Interface", f"type={kind}") == ""


def mirror_rows(ovs, bridge):
    """Every Mirror on the bridge, vtap's or not: {name: (src port names, dst port names, external_ids)}."""
    names = {uuid: ovs.vsctl("get", "Port", uuid, "name").strip('"') for uuid in ovs.vsctl("--columns=_uuid", "--bare", "list", "Port").split()}
    rows = {}
    for uuid in ovs.vsctl("get", "Bridge", bridge, "mirrors").strip("[]").replace(",", " ").split():
        row = json.loads(ovs.vsctl("--format=json", "--columns=name,select_src_port,select_dst_port,external_ids", "list", "Mirror", uuid))["data"][0]

        def ports(column):
            kind, value = column
            return {names[v[1]] for v in value} if kind == "set" else {names[value]}

        rows[row[0]] = (ports(row[1]), ports(row[2]), dict(row[3][1]))
    return rows


def test_ovs_40_flows_on_one_bridge_are_one_mirror_per_session(libvirt_host, ovs, ovs_lan, guests, tmp_path):
    """OVS holds at most 32 mirrors per bridge: 40 flows in two sessions are two Mirror rows listing their ports."""
    from vtap_core.client import Client

    nics = []
    for n in (20, 21):
        dom, macs = guests.start(ovs_lan, n, nics=20, ovs=True)
        nics.extend(zip(macs, host_devices(dom), [dom.UUIDString()] * 20))
    with Client(driver="kvm", state=str(tmp_path / "vtap.db"), uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        vtap.create_session("many", to=f"port:{ovs_lan.monitor}", backend="ovs")
        vtap.create_session("few", to=f"port:{ovs_lan.monitor}", backend="ovs")
        for mac, _, uuid in nics[:30]:
            vtap.add_flow("many", vm=uuid, nic=mac, direction="out")
        for mac, _, uuid in nics[30:]:
            vtap.add_flow("few", vm=uuid, nic=mac, direction="both")
        rows = mirror_rows(ovs, ovs_lan.bridge)
        assert len(rows) == 2, rows
        by_session = {json.loads(ext["vtap-mirror"])["session"]: (src, dst) for src, dst, ext in rows.values()}
        devices = [device for _, device, _ in nics]
        assert by_session["many"] == (set(devices[:30]), set())  # out: what the VMs send = arriving at the bridge
        assert by_session["few"] == (set(devices[30:]), set(devices[30:]))
        status = vtap.status()
        assert len(status) == 40 and {row.state for row in status} == {"active"}, [(r.flow, r.state, r.problem) for r in status]

        # One flow goes: its port leaves the session's Mirror, the others stay.
        vtap.delete_flow("many-1")
        src, dst, _ = next(r for r in mirror_rows(ovs, ovs_lan.bridge).values() if "many" in r[2]["vtap-mirror"])
        assert src == set(devices[1:30]) and dst == set()
        assert vtap.reconcile().empty  # idempotent

        vtap.delete_session("many")
        vtap.delete_session("few")
        assert mirror_rows(ovs, ovs_lan.bridge) == {}


def test_ovs_33rd_session_on_a_bridge_is_refused(libvirt_host, ovs, ovs_lan, guests, tmp_path, monkeypatch):
    """A 33rd mirror on a bridge would silently do nothing in vswitchd: refused at flow add (exit 2,
    nothing changed), and shown as a problem when it only becomes needed later (a VM starts)."""
    import subprocess
    import sys
    from pathlib import Path

    from vtap_core.client import Client

    nics = []
    for n in (30, 31):
        dom, macs = guests.start(ovs_lan, n, nics=16, ovs=True)
        nics.extend((mac, dom.UUIDString()) for mac in macs)
    late, (late_mac,) = guests.start(ovs_lan, 32, ovs=True)
    late.destroy()
    state = str(tmp_path / "vtap.db")
    with Client(driver="kvm", state=state, uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        for i, (mac, uuid) in enumerate(nics):
            vtap.create_session(f"s{i:02}", to=f"port:{ovs_lan.monitor}", backend="ovs")
            vtap.add_flow(f"s{i:02}", vm=uuid, nic=mac, direction="out")
        assert len(mirror_rows(ovs, ovs_lan.bridge)) == 32
        vtap.create_session("s32", to=f"port:{ovs_lan.monitor}", backend="ovs")  # no flow yet: no mirror needed

    def mirrors():  # all but the statistics, which vswitchd updates by itself
        return ovs.vsctl("--format=json", "--columns=_uuid,name,select_src_port,select_dst_port,output_port,external_ids", "list", "Mirror")

    before = (mirrors(), len(Client(driver="kvm", state=state, uri=libvirt_host.uri).flows()))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", VTAP_OVSDB=ovs.remote)
    mac, uuid = nics[0]
    cli = subprocess.run(["vtap", "--driver", "kvm", "--uri", libvirt_host.uri, "--state", state, "flow", "add", "s32", "--vm", uuid, "--nic", mac],
                         capture_output=True, text=True, env=env)
    assert cli.returncode == 2, cli
    (line,) = cli.stderr.strip().splitlines()
    assert f"bridge {ovs_lan.bridge} would need 33 mirrors" in line and "at most 32" in line, line
    assert (mirrors(), len(Client(driver="kvm", state=state, uri=libvirt_host.uri).flows())) == before

    with Client(driver="kvm", state=state, uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        vtap.add_flow("s32", vm=late.UUIDString(), direction="out")  # not running: nothing to mirror yet
        late.create()
        plan = vtap.reconcile()
        assert [(s, f) for s, f, _ in plan.problems] == [("s32", "s32-1")], plan.problems
        assert len(mirror_rows(ovs, ovs_lan.bridge)) == 32  # the 32 already there keep working
        status = {row.flow: row for row in vtap.status()}
        assert status["s32-1"].state != "active" and "at most 32" in status["s32-1"].problem
        assert status["s00-1"].state == "active"
        for i in range(33):
            vtap.delete_session(f"s{i:02}")
        assert mirror_rows(ovs, ovs_lan.bridge) == {}


def test_ovs_direction_in_is_select_dst_port_and_copies_what_the_guest_receives(libvirt_host, ovs, ovs_lan, guests, tmp_path):
    """OVS's select_dst_port = packets the bridge sends out of the port = what the VM receives (`in`)."""
    from vtap_core.client import Client

    dom, (mac,) = guests.start(ovs_lan, 13, ovs=True)
    (device,) = host_devices(dom)
    with Client(driver="kvm", state=str(tmp_path / "vtap.db"), uri=libvirt_host.uri, ovsdb=ovs.remote) as vtap:
        vtap.create_session("ovsin", to=f"port:{ovs_lan.monitor}", backend="ovs")  # tapped while it boots (see above)
        vtap.add_flow("ovsin", vm=dom.UUIDString(), direction="in")
        ((src, dst, _),) = mirror_rows(ovs, ovs_lan.bridge).values()
        assert (src, dst) == (set(), {device})
        wait_sending(device)
        counts = lab.count_frames(ovs_lan.counter, mac, 30, until=("in", 5))
        assert counts["in"] >= 5, counts  # the peer's echo replies to the guest
        assert counts["out"] == 0, counts  # nothing the guest sent
        vtap.delete_session("ovsin")
