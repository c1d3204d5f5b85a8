"""datapath=tcx through the linux driver: vtap's mirrors on the tcx hook, observed from their pins.

    peer0 -- src0 (mirrored: its tcx hooks)      mon0 -- mon1 (copies counted here)

Read back from the kernel: the programs on a hook (BPF_PROG_QUERY), the pins
in bpffs, `tc qdisc show` (no clsact added), and copies where they arrive.
"""

import os
import shutil
import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from test_tc_vxlan import COLLECTOR, collector, datagrams, decapsulate  # noqa: F401 (collector: the fixture)
from vtap_core import reconcile
from vtap_core.errors import OperationFailed
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux import bpfsys, tcxmirror


@pytest.fixture
def tcx(lab):
    """The standard lab on a kernel with tcx; every pin of its namespace gone afterwards."""
    if not bpfsys.tcx_supported():
        pytest.skip(f"this kernel ({os.uname().release}) has no tcx hook")
    if not lab.ip("link", "show", "src0", check=False).stdout:
        lab.standard()
    directory = tcxmirror.pin_dir(lab.netns)
    try:
        yield lab
    finally:
        lab.close()
        with tcxmirror.in_netns(lab.netns):
            for name in os.listdir(directory) if os.path.isdir(directory) else []:
                tcxmirror.detach(os.path.join(directory, name))
        if os.path.isdir(directory):
            os.rmdir(directory)


def hook_programs(lab, device, hook):
    """Names of the programs on a device's tcx hook, in the order they run."""
    with tcxmirror.in_netns(lab.netns):
        names = []
        for prog_id in bpfsys.query_tcx(socket.if_nametoindex(device), hook).prog_ids:
            with bpfsys.prog_by_id(prog_id) as prog:
                names.append(bpfsys.prog_info(prog).name)
        return names


def pins(lab):
    directory = tcxmirror.pin_dir(lab.netns)
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def udp_frames(marker, dport, count, src="10.1.0.1", dst="10.1.0.2"):
    return [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / UDP(sport=4000 + i, dport=dport) / marker) for i in range(count)]


def copies_on_mon1(lab, send):
    """Frames carrying a fresh marker that arrive on mon1 while send(marker) runs."""
    marker = new_marker()
    sock = lab.packet_socket("mon1")
    try:
        send(marker)
        return receive(sock, marker)
    finally:
        sock.close()


def port_flow(direction="in", filter="udp port 9"):
    return TapSession("web", "port:mon0"), TapFlow("f1", "web", Source(interface="src0"), direction, filter)


def test_port_target_filter_and_direction_honoured_status_counts_copies_no_clsact(tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow()
    bindings = driver.plan([session], [flow])
    (mirror,) = bindings
    assert mirror.get("datapath") == "tcx"
    driver.apply(bindings)
    driver.apply(bindings)  # idempotent: still one program, one pin

    assert "clsact" not in lab.qdiscs("src0")
    assert lab.filter_handles("src0", "ingress") == []
    assert hook_programs(lab, "src0", "ingress") == [f"vtap_{driver.dataplane.catalog.mark_of(mirror).hex()[-10:]}"]
    assert hook_programs(lab, "src0", "egress") == []
    (pin,) = pins(lab)
    assert os.stat(os.path.join(tcxmirror.pin_dir(lab.netns), pin)).st_mode & 0o777 == 0o600
    assert os.stat(tcxmirror.pin_dir(lab.netns)).st_mode & 0o777 == 0o700

    def send(marker):
        lab.send("peer0", udp_frames(marker, 9, 6) + udp_frames(marker, 10, 4))  # src0 receives: 6 match
        lab.send("src0", udp_frames(marker, 9, 3))  # src0 sends: another direction

    copies = copies_on_mon1(lab, send)
    assert len(copies) == 6
    assert all(copy[36:38] == b"\x00\x09" for copy in copies)  # UDP dport 9

    (observed,) = driver.observe()
    assert (observed.key, observed.spec) == (mirror.key, mirror.spec)
    assert observed.counters.packets == 6
    assert observed.counters.bytes == sum(len(f) for f in udp_frames(b"x" * 12, 9, 6))
    assert observed.counters.dropped == 0
    assert reconcile.diff(bindings, driver.observe()).empty


def test_vxlan_target_copies_arrive_through_the_tunnel(collector, tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session = TapSession("tun", f"vxlan://{COLLECTOR}?vni=4243")
    flow = TapFlow("f1", "tun", Source(interface="src0"), "in", "udp port 9")
    reconcile.reconcile(driver, [session], [flow])
    mirrors = [b for b in driver.plan([session], [flow]) if b.get("type") == "mirror"]
    assert [b.get("datapath") for b in mirrors] == ["tcx"]
    assert "clsact" not in lab.qdiscs("src0")
    sock = collector(4789)
    marker = new_marker()
    sent = udp_frames(marker, 9, 5) + udp_frames(marker, 10, 3)
    lab.send("peer0", sent)
    got = datagrams(sock, marker)
    assert len(got) == 5
    assert sorted(decapsulate(d)[2] for d in got) == sorted(sent[:5])
    assert {decapsulate(d)[1] for d in got} == {4243}
    (observed,) = [b for b in driver.observe() if b.get("type") == "mirror"]
    assert observed.counters.packets == 5 and observed.counters.target is not None


def test_target_recreated_is_drift_and_reconcile_brings_copies_back(tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("in", "")
    reconcile.reconcile(driver, [session], [flow])
    planned = driver.plan([session], [flow])
    lab.ip("link", "del", "mon0")
    lab.veth("mon0", "mon1")
    assert copies_on_mon1(lab, lambda m: lab.send("peer0", udp_frames(m, 9, 3))) == []
    (drifted,) = driver.observe()
    assert drifted.get("to") == "" and drifted.spec != planned[0].spec
    assert not reconcile.diff(planned, driver.observe()).empty
    reconcile.reconcile(driver, [session], [flow])
    assert reconcile.diff(planned, driver.observe()).empty
    assert len(copies_on_mon1(lab, lambda m: lab.send("peer0", udp_frames(m, 9, 3)))) == 3
    assert len(pins(lab)) == 1 and len(hook_programs(lab, "src0", "ingress")) == 1


def test_device_renamed_is_drift(tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("in", "")
    reconcile.reconcile(driver, [session], [flow])
    lab.ip("link", "set", "src0", "down")
    lab.ip("link", "set", "src0", "name", "src9")
    (drifted,) = driver.observe()
    assert drifted.get("device") == "src9"


def test_device_gone_the_defunct_pin_is_removed_and_the_mirror_comes_back_with_the_device(tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("in", "")
    reconcile.reconcile(driver, [session], [flow])
    lab.ip("link", "del", "src0")
    (orphan,) = driver.observe()
    assert orphan.key.startswith(f"unknown/{lab.netns}/")
    plan = reconcile.reconcile(driver, [session], [flow])
    assert plan.problems  # the flow's interface is missing
    assert pins(lab) == [] and driver.observe() == []
    lab.veth("src0", "peer0")
    reconcile.reconcile(driver, [session], [flow])
    assert len(pins(lab)) == 1
    assert len(copies_on_mon1(lab, lambda m: lab.send("peer0", udp_frames(m, 9, 3)))) == 3


def test_an_orphan_pin_is_found_and_reconcile_removes_it(tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("both", "")
    reconcile.reconcile(driver, [session], [flow])
    assert len(pins(lab)) == 2
    driver.close()
    shutil.rmtree(lab.state_dir)  # the catalog lost: the pins name no binding
    driver = lab.driver(datapath="tcx")
    orphans = driver.observe()
    assert len(orphans) == 2 and all(b.key.startswith(f"unknown/{lab.netns}/") for b in orphans)
    reconcile.reconcile(driver, [], [])
    assert pins(lab) == []
    assert hook_programs(lab, "src0", "ingress") == [] and hook_programs(lab, "src0", "egress") == []
    assert driver.observe() == []


def test_another_state_dir_does_not_take_the_pins_for_orphans(tcx, tmp_path):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("in", "")
    reconcile.reconcile(driver, [session], [flow])
    from vtap_drivers.linux.driver import LinuxDriver

    other = LinuxDriver(state_dir=str(tmp_path / "other"), netns=lab.netns, datapath="tcx")
    try:
        assert other.observe() == []
        reconcile.reconcile(other, [], [])
    finally:
        other.close()
    assert len(pins(lab)) == 1 and len(hook_programs(lab, "src0", "ingress")) == 1


def test_remove_leaves_nothing(tcx):
    lab = tcx
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("both", "")
    bindings = driver.plan([session], [flow])
    driver.apply(bindings)
    assert len(pins(lab)) == 2
    driver.remove(bindings)
    assert pins(lab) == []
    assert hook_programs(lab, "src0", "ingress") == [] and hook_programs(lab, "src0", "egress") == []
    assert "clsact" not in lab.qdiscs("src0")
    assert driver.observe() == []
    assert copies_on_mon1(lab, lambda m: lab.send("peer0", udp_frames(m, 9, 3))) == []


def test_switching_datapath_is_remove_and_apply(tcx):
    lab = tcx
    session, flow = port_flow("in", "")
    reconcile.reconcile(lab.driver(datapath="tcx"), [session], [flow])
    assert len(pins(lab)) == 1
    plain = lab.driver()
    reconcile.reconcile(plain, [session], [flow])
    assert pins(lab) == [] and hook_programs(lab, "src0", "ingress") == []
    assert len(lab.filter_handles("src0", "ingress")) == 1
    assert len(copies_on_mon1(lab, lambda m: lab.send("peer0", udp_frames(m, 9, 2)))) == 2


def test_someone_elses_ingress_qdisc_and_htb_root_leave_both_hooks_on_tcx(tcx):
    lab = tcx
    # Someone's ingress qdisc holds the clsact place (cls_bpf's egress would go on the htb root);
    # the tcx hook runs before any qdisc, so both directions stay there.
    lab.tc("qdisc", "add", "dev", "src0", "ingress")
    lab.tc("qdisc", "add", "dev", "src0", "root", "handle", "1:", "htb")
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("both", "")
    bindings = driver.plan([session], [flow])
    assert sorted((b.get("hook"), b.get("datapath"), b.get("parent")) for b in bindings if b.get("type") == "mirror") == [("egress", "tcx", None), ("ingress", "tcx", None)]
    driver.apply(bindings)
    assert lab.tc("filter", "show", "dev", "src0", "parent", "1:").stdout == ""
    assert len(pins(lab)) == 2
    copies = copies_on_mon1(lab, lambda m: (lab.send("peer0", udp_frames(m, 9, 2)), lab.send("src0", udp_frames(m, 9, 3))))
    assert len(copies) == 5
    assert reconcile.diff(bindings, driver.observe()).empty
    driver.remove(bindings)
    assert pins(lab) == [] and "ingress ffff:" in lab.qdiscs("src0")


def test_an_untranslatable_program_stays_on_cls_bpf_and_the_log_says_why_once(tcx, caplog):
    lab = tcx
    cpu = (0x20, 0, 0, (-0x1000 + 36) & 0xFFFFFFFF)  # classic "A = the CPU" (SKF_AD_CPU): no __sk_buff field for it
    assert "cannot be translated" in tcxmirror.why_not([cpu, (0x06, 0, 0, 0xFFFF)])
    # libpcap's protochain loops, which the translator refuses: the mirror is planned as datapath=tc plans it.
    session, flow = port_flow("in", "ip6 protochain 17")
    tcx_driver, tc_driver = lab.driver(datapath="tcx"), lab.driver()
    tcxmirror._said.clear()
    (mirror,) = tcx_driver.plan([session], [flow])
    tcx_driver.plan([session], [flow])
    assert mirror.get("datapath") is None
    assert [(b.key, b.spec) for b in tc_driver.plan([session], [flow])] == [(mirror.key, mirror.spec)]
    said = [r.getMessage() for r in caplog.records if "cannot be translated" in r.getMessage()]
    assert len(said) == 1 and "using clsact + cls_bpf + mirred" in said[0]


def test_a_pin_dir_someone_else_owns_fails_apply_and_leaves_nothing(tcx):
    lab = tcx
    directory = tcxmirror.pin_dir(lab.netns)
    bpfsys.ensure_bpffs()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chown(directory, 65534, 65534)  # planted by another user: vtap pins nothing through it
    driver = lab.driver(datapath="tcx")
    session, flow = port_flow("both", "")
    bindings = driver.plan([session], [flow])
    with pytest.raises(OperationFailed, match="cannot put the tcx mirror in place: .* is not a directory of this user's"):
        driver.apply(bindings)
    os.chown(directory, 0, 0)
    assert pins(lab) == []
    assert hook_programs(lab, "src0", "ingress") == [] and hook_programs(lab, "src0", "egress") == []
    assert "clsact" not in lab.qdiscs("src0")
    assert [b for b in driver.observe() if b.get("type") == "mirror"] == []


def test_pcap_target_records_exactly_the_matching_frames(tcx, tmp_path):
    from test_capture import read_frames, wait_for

    from vtap_core.client import Client
    from vtap_drivers.linux.capture import running_captures, stop_capture_process

    lab = tcx
    path = tmp_path / "web.pcapng"
    try:
        with Client(driver="linux", state=os.path.join(lab.state_dir, "vtap.db"), netns=lab.netns, datapath="tcx") as vtap:
            vtap.create_session("web", to=f"pcap:{path}")
            vtap.add_flow("web", interface="src0", direction="in", filter="udp port 9")
            assert [name.startswith("ring-") for name in pins(lab)] == [False, True] and "clsact" not in lab.qdiscs("src0")  # the mirror, the sink's BPF ring
            marker = new_marker()
            wanted = udp_frames(marker, 9, 5)
            lab.send("peer0", wanted + udp_frames(marker, 10, 3))
            assert wait_for(lambda: len(read_frames(path)) == 5)
            assert sorted(raw for raw, _ in read_frames(path)) == sorted(wanted)
            (row,) = vtap.status()
            assert (row.state, row.packets) == ("active", 5)
            vtap.delete_session("web")
            assert pins(lab) == []
    finally:
        for name in running_captures(lab.state_dir):
            stop_capture_process(name, lab.state_dir)
