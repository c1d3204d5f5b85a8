"""Apply, observe and remove against a real kernel: idempotency, drift, orphans, other people's tc state."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from datapaths import on_both_datapaths, tc_only
from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from vtap_core import reconcile
from vtap_core.errors import NotFound, Unsupported, ValidationError
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux.dataplane import hooks_for

MATCH_ALL = "1,6 0 0 262144"  # someone else's classic BPF: "ret #262144"


def web_session_and_flows():
    session = TapSession("web", "port:mon0")
    flows = [
        TapFlow("f1", "web", Source(interface="src0"), "both", "tcp port 80"),
        TapFlow("f2", "web", Source(interface="peer0"), "in"),
    ]
    return session, flows


def test_hooks_for_host_interfaces_and_vm_ports():
    assert hooks_for("in") == ("ingress",)
    assert hooks_for("out") == ("egress",)
    assert hooks_for("both") == ("ingress", "egress")
    # A VM's host-side device: what the VM sends arrives at the device (ingress).
    assert hooks_for("out", vm_port=True) == ("ingress",)
    assert hooks_for("in", vm_port=True) == ("egress",)


@on_both_datapaths
def test_apply_three_times_leaves_one_filter_per_flow_direction(lab):
    lab.standard()
    driver = lab.driver()
    session, flows = web_session_and_flows()
    bindings = driver.plan([session], flows)
    for _ in range(3):
        driver.apply(bindings)
    assert lab.mirrors("src0", "ingress") == 1
    assert lab.mirrors("src0", "egress") == 1
    assert lab.mirrors("peer0", "ingress") == 1
    assert lab.mirrors("peer0", "egress") == 0
    # And what observe reads back is exactly what plan said.
    observed = driver.observe()
    assert sorted((b.key, b.spec) for b in observed) == sorted((b.key, b.spec) for b in bindings)
    assert reconcile.diff(bindings, observed).empty


@on_both_datapaths
def test_counters_come_from_the_kernel(lab):
    lab.standard()
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flow = TapFlow("f1", "web", Source(interface="src0"), "in")
    driver.apply(driver.plan([session], [flow]))
    marker = new_marker()
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + marker + bytes(60)
    lab.send("peer0", [frame] * 5)
    (observed,) = driver.observe()
    assert observed.counters.packets == 5
    assert observed.counters.bytes == 5 * len(frame)


@tc_only("deletes a cls_bpf filter by its handle (tcx: test_tcx_datapath covers a pin removed)")
def test_a_filter_deleted_by_hand_comes_back_on_the_next_reconcile(lab):
    lab.standard()
    driver = lab.driver()
    session, flows = web_session_and_flows()
    reconcile.reconcile(driver, [session], flows)
    (line,) = lab.filter_handles("src0", "egress")
    handle = line.split(" handle ")[1].split()[0]
    lab.tc("filter", "del", "dev", "src0", "egress", "pref", "7", "handle", handle, "bpf")
    assert lab.filter_handles("src0", "egress") == []
    plan = reconcile.reconcile(driver, [session], flows)
    assert [b.key for b in plan.add] == [f"tc/{lab.netns}/src0/egress/web/f1"]
    assert len(lab.filter_handles("src0", "egress")) == 1
    assert reconcile.reconcile(driver, [session], flows).empty


@on_both_datapaths
def test_a_changed_filter_replaces_the_old_one(lab):
    lab.standard()
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    reconcile.reconcile(driver, [session], [TapFlow("f1", "web", Source(interface="src0"), "in", "tcp")])
    plan = reconcile.reconcile(driver, [session], [TapFlow("f1", "web", Source(interface="src0"), "in", "udp")])
    assert len(plan.remove) == 1 and len(plan.add) == 1
    assert lab.mirrors("src0", "ingress") == 1
    (observed,) = driver.observe()
    assert observed.get("filter") == "udp"


@on_both_datapaths
def test_a_recreated_target_device_is_noticed_and_repaired(lab):
    lab.standard()
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flow = TapFlow("f1", "web", Source(interface="src0"), "in")
    reconcile.reconcile(driver, [session], [flow])
    lab.ip("link", "del", "mon0")
    lab.veth("mon0", "mon1")
    plan = reconcile.reconcile(driver, [session], [flow])
    assert len(plan.add) == 1 and len(plan.remove) == 1
    marker = new_marker()
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + marker + bytes(60)
    counter = lab.packet_socket("mon1")
    try:
        lab.send("peer0", [frame])
        assert receive(counter, marker) == [frame]
    finally:
        counter.close()


@tc_only("the clsact qdisc vtap adds for its filters")
def test_clsact_vtap_added_goes_with_its_last_filter_but_others_stay(lab):
    lab.standard()
    lab.veth("own0", "own1")
    # Someone else's clsact and filter on own0; nothing on src0.
    lab.tc("qdisc", "add", "dev", "own0", "clsact")
    lab.tc("filter", "add", "dev", "own0", "ingress", "pref", "50", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", "own1")
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flows = [TapFlow("f1", "web", Source(interface="src0"), "in"), TapFlow("f2", "web", Source(interface="own0"), "both")]
    bindings = driver.plan([session], flows)
    driver.apply(bindings)
    assert "clsact" in lab.qdiscs("src0")
    driver.remove(bindings)
    assert "clsact" not in lab.qdiscs("src0")  # vtap added it: gone with vtap's last filter
    assert "clsact" in lab.qdiscs("own0")  # someone else's: stays, with their filter
    assert len(lab.filter_handles("own0", "ingress")) == 1
    assert lab.filter_handles("own0", "egress") == []
    assert driver.observe() == []


@tc_only("the clsact qdisc vtap adds for its filters")
def test_clsact_vtap_added_stays_while_someone_else_uses_it(lab):
    lab.standard()
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    bindings = driver.plan([session], [TapFlow("f1", "web", Source(interface="src0"), "in")])
    driver.apply(bindings)
    lab.tc("filter", "add", "dev", "src0", "egress", "pref", "50", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", "mon0")
    driver.remove(bindings)
    assert "clsact" in lab.qdiscs("src0")
    assert lab.filter_handles("src0", "ingress") == []
    assert len(lab.filter_handles("src0", "egress")) == 1


KILLED_APPLY = textwrap.dedent(
    """
    import os, signal, sys
    from vtap_core.model import Source, TapFlow, TapSession
    from vtap_drivers.linux.driver import LinuxDriver
    driver = LinuxDriver(state_dir=sys.argv[1], netns=sys.argv[2], datapath=os.environ.get("VTAP_DATAPATH"))
    session = TapSession("web", "vxlan://192.0.2.7?vni=77")
    flows = [TapFlow("f1", "web", Source(interface="src0"), "both", "udp"), TapFlow("f2", "web", Source(interface="peer0"), "out")]
    driver.apply(driver.plan([session], flows))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def crash_after_apply(lab):
    result = subprocess.run([sys.executable, "-c", KILLED_APPLY, lab.state_dir, lab.netns], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr


@on_both_datapaths
def test_orphans_of_a_killed_process_are_found_and_removed_others_untouched(lab):
    lab.standard()
    lab.veth("own0", "own1")
    lab.tc("qdisc", "add", "dev", "own0", "clsact")
    lab.tc("filter", "add", "dev", "own0", "ingress", "pref", "7", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", "own1")
    lab.tc("qdisc", "add", "dev", "src0", "clsact")
    lab.tc("filter", "add", "dev", "src0", "ingress", "pref", "7", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", "own1")
    crash_after_apply(lab)
    driver = lab.driver()
    orphans = driver.observe()
    assert sorted(b.key for b in orphans) == sorted([
        f"tc/{lab.netns}/src0/ingress/web/f1",
        f"tc/{lab.netns}/src0/egress/web/f1",
        f"tc/{lab.netns}/peer0/egress/web/f2",
        f"vxlan/{lab.netns}/{orphans_vxlan_name(orphans)}",
    ])
    # Nobody wants them any more: the next reconcile removes exactly them.
    plan = reconcile.reconcile(driver, [], [])
    assert len(plan.remove) == 4
    assert driver.observe() == []
    assert lab.ip("link", "show", "type", "vxlan").stdout == ""
    assert "clsact" not in lab.qdiscs("peer0")  # vtap's own
    assert "clsact" in lab.qdiscs("src0")  # was there before vtap
    assert len(lab.filter_handles("src0", "ingress")) == 1  # someone else's, same priority as vtap's
    assert len(lab.filter_handles("own0", "ingress")) == 1


def orphans_vxlan_name(bindings):
    (device,) = [b.get("device") for b in bindings if b.get("type") == "vxlan"]
    return device


@on_both_datapaths
def test_orphans_are_found_even_when_the_state_dir_is_lost(lab):
    lab.standard()
    crash_after_apply(lab)
    shutil.rmtree(lab.state_dir)
    driver = lab.driver()
    orphans = driver.observe()
    assert len(orphans) == 4 and all(b.key.startswith("unknown/") for b in orphans)
    driver.remove(orphans)
    assert driver.observe() == []
    for device in ("src0", "peer0"):
        for hook in ("ingress", "egress"):
            assert lab.mirrors(device, hook) == 0
    assert lab.ip("link", "show", "type", "vxlan").stdout == ""


@pytest.mark.parametrize(
    "session, flow, error, words",
    [
        (TapSession("s", "port:mon0"), TapFlow("f", "s", Source(interface="nosuch0")), NotFound, "interface nosuch0"),
        (TapSession("s", "port:nosuch1"), TapFlow("f", "s", Source(interface="src0")), NotFound, "interface nosuch1"),
        (TapSession("s", "port:mon0"), TapFlow("f", "s", Source(interface="src0"), filter="tcp port http2x"), ValidationError, "filter:"),
        (TapSession("s", "port:mon0"), TapFlow("f", "s", Source(interface="src0"), filter="vlan and and"), ValidationError, "syntax error"),
        (TapSession("s", "gre://192.0.2.1?key=1"), TapFlow("f", "s", Source(interface="src0")), Unsupported, "gre"),
        (TapSession("s", "erspan://192.0.2.1?id=1"), TapFlow("f", "s", Source(interface="src0")), Unsupported, "erspan"),
        (TapSession("s", "port:mon0", snaplen=128), TapFlow("f", "s", Source(interface="src0")), Unsupported, "snaplen"),
        (TapSession("s", "vm:6b1c6a6e-0c39-4c36-9a3e-1d8d3b0a4f21"), TapFlow("f", "s", Source(interface="src0")), Unsupported, "vm targets"),
        (TapSession("s", "port:src0"), TapFlow("f", "s", Source(interface="src0")), ValidationError, "mirrored device src0 itself"),
        (TapSession("s", "port:mon0"), TapFlow("f", "s", Source(vm="web-1")), Unsupported, "vm sources"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(lab, session, flow, error, words):
    lab.standard()
    before = {device: lab.qdiscs(device) for device in ("src0", "peer0", "mon0")}
    driver = lab.driver()
    with pytest.raises(error) as caught:
        driver.plan([session], [flow])
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert {device: lab.qdiscs(device) for device in before} == before
    assert not os.path.exists(os.path.join(lab.state_dir, f"tc-{lab.netns}.json")) or driver.observe() == []


def test_two_sessions_on_one_vni_and_port_are_refused(lab):
    lab.standard()
    driver = lab.driver()
    sessions = [TapSession("a", "vxlan://192.0.2.1?vni=5"), TapSession("b", "vxlan://192.0.2.2?vni=5")]
    with pytest.raises(ValidationError, match="vni 5 on UDP port 4789 is already the target of session a"):
        driver.plan(sessions, [])


@on_both_datapaths
def test_the_catalog_forgets_mirrors_of_devices_that_are_gone(lab):
    lab.standard()
    lab.veth("tmp0", "tmp1")
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flows = [TapFlow("f1", "web", Source(interface="src0"), "in"), TapFlow("f2", "web", Source(interface="tmp0"), "in")]
    bindings = driver.plan([session], flows)
    driver.apply(bindings)
    lab.ip("link", "del", "tmp0")
    observed = driver.observe()
    # tcx: the pin outlives its device, an orphan until removed (tc: the kernel took the filter along)
    orphans = [b for b in observed if b.key.startswith("unknown/")]
    assert len(orphans) == (1 if lab.datapath == "tcx" else 0)
    assert [b.key for b in observed if b not in orphans] == [bindings[0].key]
    driver.remove([bindings[0], *orphans])
    assert driver.observe() == []
    with open(os.path.join(lab.state_dir, f"tc-{lab.netns}.json")) as f:
        catalog = json.load(f)
    assert (catalog["bindings"], catalog["qdiscs"]) == ({}, {})


def test_watch_hints_when_a_device_appears_or_goes(lab):
    import threading
    import time

    driver = lab.driver()
    stop = threading.Event()
    hints = []

    def follow():
        for hint in driver.watch(stop):
            hints.append(hint)

    watcher = threading.Thread(target=follow)
    watcher.start()
    try:
        time.sleep(0.3)
        lab.veth("new0", "new1")
        deadline = time.monotonic() + 5
        while not hints and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert hints and set(hints) == {None}
    assert not watcher.is_alive()


@on_both_datapaths
def test_a_pcap_session_whose_snaplen_changes_is_right_after_one_reconcile(lab, tmp_path):
    from scapy.utils import rdpcap

    from vtap_drivers.linux.capture import running_captures

    lab.standard()
    driver = lab.driver()
    path = str(tmp_path / "web.pcapng")
    flow = TapFlow("f1", "web", Source(interface="src0"), "in")
    try:
        reconcile.reconcile(driver, [TapSession("web", f"pcap:{path}", snaplen=64)], [flow])
        session = TapSession("web", f"pcap:{path}", snaplen=128)
        reconcile.reconcile(driver, [session], [flow])
        assert reconcile.reconcile(driver, [session], [flow]).empty
        (process,) = running_captures(lab.state_dir).values()
        assert process["snaplen"] == 128
        marker = new_marker()
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + marker + bytes(300)
        lab.send("peer0", [frame])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(marker in bytes(p) for p in rdpcap(path)):
            time.sleep(0.1)
        assert [bytes(p) for p in rdpcap(path) if marker in bytes(p)] == [frame[:128]]
    finally:
        reconcile.reconcile(driver, [], [])
    assert running_captures(lab.state_dir) == {}
    assert lab.ip("link", "show", "type", "ifb").stdout == ""


@on_both_datapaths
def test_two_state_dirs_on_one_host_never_touch_each_others_mirrors(lab, tmp_path):
    from vtap_drivers.linux.driver import LinuxDriver

    lab.standard()
    lab.veth("mon2", "mon3")
    ours, theirs = lab.driver(), LinuxDriver(state_dir=str(tmp_path / "other"), netns=lab.netns, datapath=lab.datapath)
    try:
        mine = ours.plan([TapSession("web", "port:mon0")], [TapFlow("f1", "web", Source(interface="src0"), "in")])
        other = theirs.plan([TapSession("db", "vxlan://192.0.2.9?vni=3")], [TapFlow("f1", "db", Source(interface="src0"), "in")])
        ours.apply(mine)
        theirs.apply(other)
        assert sorted(b.key for b in ours.observe()) == [b.key for b in mine]
        assert reconcile.reconcile(ours, [], []).summary()["removed"] == 1
        assert sorted(b.key for b in theirs.observe()) == sorted(b.key for b in other)
        assert lab.mirrors("src0", "ingress") == 1
    finally:
        reconcile.reconcile(theirs, [], [])
        theirs.close()
    assert lab.mirrors("src0", "ingress") == 0
