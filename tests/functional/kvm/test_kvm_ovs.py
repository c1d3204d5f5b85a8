"""The ovs backend: a guest NIC on an Open vSwitch bridge (userspace datapath),
mirrored by an OVS Mirror row; copies counted on the output port; the row goes
away with the session."""

import json

import pytest

from .kvm_lab import host_devices, wait_for, wait_sending
from . import kvm_lab as lab


def vtap_mirrors(ovs):
    rows = json.loads(ovs.vsctl("--format=json", "--columns=name,external_ids,select_src_port,select_dst_port", "list", "Mirror"))
    return [row for row in rows["data"] if "vtap-binding" in json.dumps(row)]


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
