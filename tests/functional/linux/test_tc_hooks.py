"""Other people's tc state on a mirrored device: an `ingress` qdisc (Proxmox `rate=`, libvirt
<bandwidth>), a root qdisc that shapes, a filter at vtap's priority, a shared block, renamed devices.

Every test counts the copies that reach the target (mon1): `in` copies carry one marker, `out`
copies another, so a copy of the wrong direction is seen as such.
"""

import time

import pytest

from datapaths import on_both_datapaths, tc_only
from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from vtap_core import reconcile
from vtap_core.client import Client
from vtap_core.errors import OperationFailed, ValidationError
from vtap_core.model import Source, TapFlow, TapSession


def frame(marker: bytes) -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + marker + bytes(60)


def copies(lab, sends) -> dict:
    """Send frames ({device: (marker, count)}) and count the copies of each marker at mon1."""
    counter = lab.packet_socket("mon1")
    try:
        for device, (marker, count) in sends.items():
            lab.send(device, [frame(marker)] * count)
        got = receive(counter, b"VTAPT")
    finally:
        counter.close()
    return {marker: sum(marker in data for data in got) for marker, _count in sends.values()}


def in_and_out(lab, device="src0", peer="peer0") -> tuple[bytes, bytes, dict]:
    """3 frames the device receives (sent on its peer), 4 it sends: (in marker, out marker, copies)."""
    received, sent = new_marker(), new_marker()
    return received, sent, copies(lab, {peer: (received, 3), device: (sent, 4)})


def client(lab, tmp_path) -> Client:
    return Client(driver="linux", state=str(tmp_path / "vtap.db"), netns=lab.netns, datapath=lab.datapath)


def swap_names(lab, a: str, b: str) -> None:
    """What a udev rule or an operator may do: a's device is now called b, and b's a."""
    for old, new in ((a, "swap"), (b, a), ("swap", b)):
        lab.ip("link", "set", old, "name", new)


def pve_rate_limit(lab, device: str, root: str) -> None:
    """What Proxmox `rate=` and libvirt <bandwidth> put on a VM's device: an ingress qdisc with a
    police filter at priority 50, and a shaping root qdisc.

    This machine's kernel has no cls_basic or act_police (only u32, bpf, mirred; htb, tbf): a u32
    filter that matches everything holds the police filter's place and priority.
    """
    lab.tc("qdisc", "add", "dev", device, "handle", "ffff:", "ingress")
    lab.tc("filter", "add", "dev", device, "parent", "ffff:", "prio", "50", "protocol", "all", "u32", "match", "u32", "0", "0")
    if root == "htb":
        lab.tc("qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "1")
        lab.tc("class", "add", "dev", device, "parent", "1:", "classid", "1:1", "htb", "rate", "100mbit")
    else:
        lab.tc("qdisc", "add", "dev", device, "root", "handle", "1:", "tbf", "rate", "100mbit", "burst", "1m", "latency", "50ms")


@pytest.mark.parametrize("direction, want_in, want_out", [("in", 3, 0), ("out", 0, 4), ("both", 3, 4)])
@on_both_datapaths
def test_an_ingress_qdisc_and_an_htb_root_both_directions_reach_the_target(lab, direction, want_in, want_out):
    lab.standard()
    pve_rate_limit(lab, "src0", "htb")
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flows = [TapFlow("f1", "web", Source(interface="src0"), direction)]
    reconcile.reconcile(driver, [session], flows)
    received, sent, got = in_and_out(lab)
    assert got == {received: want_in, sent: want_out}
    # Read back as planned: nothing drifted, nothing to do.
    assert reconcile.reconcile(driver, [session], flows).empty
    # Their shaping is untouched: the htb class still carried what src0 sent, the police filter is there.
    assert "Sent" in lab.tc("-s", "class", "show", "dev", "src0").stdout
    assert " 0 pkt" not in lab.tc("-s", "class", "show", "dev", "src0").stdout
    assert "pref 50 u32" in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout
    # And vtap takes only its own filters away.
    reconcile.reconcile(driver, [session], [])
    qdiscs = lab.qdiscs("src0")
    assert "ingress ffff:" in qdiscs and "htb 1:" in qdiscs
    assert "pref 50 u32" in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout
    assert "bpf" not in lab.tc("filter", "show", "dev", "src0", "parent", "1:").stdout
    assert "bpf" not in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout


@tc_only("cls_bpf's place among someone's qdiscs; tcx needs none (test_on_tcx_...)")
def test_an_ingress_qdisc_and_a_tbf_root_refuse_out_and_mirror_in(lab, tmp_path):
    lab.standard()
    pve_rate_limit(lab, "src0", "tbf")
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        before = lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout
        with pytest.raises(ValidationError) as refused:
            vtap.add_flow("web", interface="src0", direction="both")
        assert refused.value.exit_code == 2
        assert "src0" in str(refused.value) and "ingress qdisc" in str(refused.value) and "tbf" in str(refused.value)
        assert vtap.store.flows() == []
        assert lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout == before
        vtap.add_flow("web", interface="src0", direction="in", name="f1")
        (row,) = vtap.status()
        assert row.state == "active" and row.problem == ""
    received, sent, got = in_and_out(lab)
    assert got == {received: 3, sent: 0}


@tc_only("cls_bpf's place among someone's qdiscs; tcx needs none (test_on_tcx_...)")
def test_a_qdisc_that_arrives_later_is_a_problem_in_status_not_a_wrong_mirror(lab, tmp_path):
    lab.standard()
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="src0", direction="out", name="f1")
        assert [r.state for r in vtap.status()] == ["active"]
        # The operator (or libvirt, PVE) puts a rate limit on the device: vtap's clsact must go first.
        lab.tc("qdisc", "del", "dev", "src0", "clsact")
        pve_rate_limit(lab, "src0", "tbf")
        (row,) = vtap.status()
        assert row.state != "active"
        assert "src0" in row.problem and "tbf" in row.problem
        vtap.reconcile()
    received, sent, got = in_and_out(lab)
    assert got == {received: 0, sent: 0}


@pytest.mark.parametrize("datapath", ["tcx"])
def test_on_tcx_an_ingress_qdisc_and_a_tbf_root_before_or_after_change_no_mirror(lab, tmp_path):
    """The tcx hook runs before any qdisc: where cls_bpf has no place for egress, tcx mirrors both ways."""
    lab.standard()
    lab.veth("src1", "peer1")
    pve_rate_limit(lab, "src0", "tbf")
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="src0", direction="both", name="f0")
        vtap.add_flow("web", interface="src1", direction="out", name="f1")
        pve_rate_limit(lab, "src1", "tbf")  # and one that arrives later
        assert [(r.flow, r.state, r.problem) for r in vtap.status()] == [("f0", "active", ""), ("f1", "active", "")]
        assert vtap.reconcile().empty
    received, sent, got = in_and_out(lab)
    assert got == {received: 3, sent: 4}
    _received, sent, got = in_and_out(lab, "src1", "peer1")
    assert got[sent] == 4
    assert "bpf" not in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout


@tc_only("a cls_bpf filter moved by hand between the clsact hooks")
def test_a_filter_on_the_ingress_block_that_was_meant_for_egress_is_drift(lab):
    """What vtap before this fix left: an egress mirror that an ingress qdisc put on its ingress block."""
    lab.standard()
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flows = [TapFlow("f1", "web", Source(interface="src0"), "out")]
    stale = driver.plan([session], flows)  # planned on a plain device: clsact's egress
    pve_rate_limit(lab, "src0", "htb")
    dataplane = lab.dataplane()
    mark = dataplane.catalog.mark_of(stale[0])
    with dataplane.catalog.locked() as catalog:
        catalog.remember(stale[0], dataplane.ifindex("src0"))
        catalog.save()
    lab.tc("filter", "add", "dev", "src0", "egress", "prio", "7", "bpf", "bytecode", "1,6 0 0 262144",
           "action", "mirred", "egress", "mirror", "dev", "mon0", "continue", "cookie", mark.hex())
    assert mark.hex() in lab.tc("filter", "show", "dev", "src0", "ingress").stdout  # where the kernel put it
    (observed,) = driver.observe()
    assert observed.get("hook") == "ingress"
    plan = reconcile.reconcile(driver, [session], flows)
    assert len(plan.remove) == 1 and len(plan.add) == 1
    received, sent, got = in_and_out(lab)
    assert got == {received: 0, sent: 4}
    assert "bpf" not in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout


@on_both_datapaths
def test_a_foreign_filter_at_vtaps_priority_is_left_alone_and_mirrors_still_work(lab, tmp_path):
    lab.standard()
    lab.veth("src1", "peer1")
    lab.tc("qdisc", "add", "dev", "src0", "clsact")
    lab.tc("filter", "add", "dev", "src0", "ingress", "prio", "7", "protocol", "ip", "u32", "match", "u32", "0", "0")
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="src0", direction="in", name="f0")
        vtap.add_flow("web", interface="src1", direction="in", name="f1")
        assert [(r.flow, r.state) for r in vtap.status()] == [("f0", "active"), ("f1", "active")]
        assert vtap.reconcile().empty
    shown = lab.tc("filter", "show", "dev", "src0", "ingress").stdout
    assert "pref 7 u32" in shown  # theirs, where it was
    assert "pref 6 bpf" in shown or lab.datapath == "tcx"  # vtap's, next to it (tcx: on the tcx hook)
    assert lab.datapath == "tc" or lab.mirrors("src0", "ingress") == 1
    first, second = new_marker(), new_marker()
    assert copies(lab, {"peer0": (first, 3), "peer1": (second, 2)}) == {first: 3, second: 2}


@tc_only("a clsact hook shared as a block refuses filters; the tcx hook is the device's own")
def test_one_device_that_fails_leaves_the_others_reconciled(lab, tmp_path):
    lab.standard()
    lab.veth("src1", "peer1")
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flows = [TapFlow("f0", "web", Source(interface="src0"), "in"), TapFlow("f1", "web", Source(interface="src1"), "in")]
    desired = driver.plan([session], flows)
    # Between plan and apply, src0's hooks become a block shared with other devices: the kernel
    # refuses filters added through the device.
    lab.tc("qdisc", "add", "dev", "src0", "ingress_block", "5", "clsact")
    plan = reconcile.diff(desired, driver.observe())
    with pytest.raises(OperationFailed) as failed:
        reconcile.execute(driver, plan)
    assert "flow f0" in str(failed.value) and "flow f1" not in str(failed.value)
    assert [(s, f) for s, f, _why in plan.problems] == [("web", "f0")]
    first, second = new_marker(), new_marker()
    assert copies(lab, {"peer0": (first, 3), "peer1": (second, 2)}) == {first: 0, second: 2}
    # The next reconcile plans around it, and status says why.
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="src1", direction="in", name="f1")
        with pytest.raises(ValidationError):
            vtap.add_flow("web", interface="src0", direction="in", name="f0")
        (row,) = vtap.status()
        assert row.state == "active"


@on_both_datapaths
def test_two_swapped_device_names_are_drift_and_the_flow_follows_the_name(lab, tmp_path):
    lab.standard()
    lab.veth("src1", "peer1")
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="src0", direction="in", name="f0")
        swap_names(lab, "src0", "src1")
        # src0 is now the device whose peer is peer1; the mirror still sits on the other one.
        (row,) = vtap.status()
        assert row.state != "active"
        plan = vtap.reconcile()
        assert len(plan.remove) == 1 and len(plan.add) == 1
        (row,) = vtap.status()
        assert row.state == "active"
    now_src0, now_src1 = new_marker(), new_marker()
    assert copies(lab, {"peer1": (now_src0, 3), "peer0": (now_src1, 2)}) == {now_src0: 3, now_src1: 0}
    assert lab.filter_handles("src1", "ingress") == []


@on_both_datapaths
def test_follow_moves_the_mirror_of_a_swap_made_while_it_was_not_running(lab, tmp_path):
    """A follower sees the names only after the swap (a watcher that saw each step would also see
    src0 missing for a moment, which hides the bug): its first resync must move the mirror."""
    import threading

    from vtap_core.follow import Follower

    lab.standard()
    lab.veth("src1", "peer1")
    with client(lab, tmp_path) as vtap:
        vtap.create_session("web", to="port:mon0")
        vtap.add_flow("web", interface="src0", direction="in", name="f0")
        swap_names(lab, "src0", "src1")
        stop = threading.Event()
        follower = threading.Thread(target=Follower(vtap, interval=60).run, args=(stop,))
        follower.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not lab.mirrors("src0", "ingress"):
                time.sleep(0.1)
        finally:
            stop.set()
            follower.join(timeout=15)
    assert lab.mirrors("src0", "ingress") == 1
    assert lab.mirrors("src1", "ingress") == 0
    now_src0, now_src1 = new_marker(), new_marker()
    assert copies(lab, {"peer1": (now_src0, 3), "peer0": (now_src1, 2)}) == {now_src0: 3, now_src1: 0}


@on_both_datapaths
def test_a_session_that_cannot_be_applied_does_not_block_changes_to_others(lab, tmp_path):
    import socket

    from pyroute2 import netns as pr_netns

    lab.standard()
    lab.veth("src1", "peer1")
    lab.ip("route", "add", "192.0.2.0/24", "dev", "mon0")  # the tunnel's remote is reachable
    with client(lab, tmp_path) as vtap:
        vtap.create_session("tunnel", to="vxlan://192.0.2.9:4790?vni=7")
        vtap.add_flow("tunnel", interface="src0", direction="in", name="t0")
        # vtap's VXLAN device goes, and a collector on this host takes its UDP port: the
        # tunnel session cannot be applied again until the port is free.
        (vxlan,) = [name for name in vtap.driver.dataplane.devices() if name.startswith("vtapx")]
        lab.ip("link", "del", vxlan)
        collector = pr_netns.create_socket(lab.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
        try:
            collector.bind(("0.0.0.0", 4790))
            vtap.create_session("web", to="port:mon0")
            vtap.add_flow("web", interface="src1", direction="in", name="w1")
            with pytest.raises(OperationFailed) as failed:
                vtap.reconcile()
            assert "session tunnel" in str(failed.value) and "4790" in str(failed.value)
            rows = {row.flow: row for row in vtap.status()}
            assert (rows["t0"].state, rows["w1"].state) == ("missing", "active")
            assert "4790" in rows["t0"].problem and rows["w1"].problem == ""
        finally:
            collector.close()
        assert [s.name for s in vtap.store.sessions()] == ["tunnel", "web"]
        # The port is free again: the next reconcile applies the tunnel and the problem goes.
        vtap.reconcile()
        rows = vtap.status()
        assert [(row.flow, row.state) for row in rows] == [("t0", "active"), ("w1", "active")]
        assert not any("4790" in row.problem for row in rows)
        assert vtap.driver.apply_problems() == []
    marker = new_marker()
    assert copies(lab, {"peer1": (marker, 2)}) == {marker: 2}


@tc_only("asserts the cls_bpf filter's place on the htb root (parent 1:)")
def test_a_vm_device_with_libvirt_bandwidth_mirrors_what_the_vm_receives_on_the_htb_root(lab):
    """libvirt <bandwidth>: <outbound> is an ingress qdisc on vnetN, <inbound> an htb root. What the
    VM receives is what the host-side device sends (its egress)."""
    lab.standard()
    pve_rate_limit(lab, "src0", "htb")
    dataplane = lab.dataplane()
    session = TapSession("web", "port:mon0")
    received_by_vm = dataplane.plan_vm_device(session, TapFlow("f1", "web", Source(interface="src0"), "in"), "src0", vm="vm-1")
    assert [(b.get("hook"), b.get("parent")) for b in received_by_vm] == [("egress", "1:")]
    dataplane.apply(received_by_vm)
    sent_by_device, sent_by_vm = new_marker(), new_marker()
    assert copies(lab, {"src0": (sent_by_device, 4), "peer0": (sent_by_vm, 3)}) == {sent_by_device: 4, sent_by_vm: 0}
