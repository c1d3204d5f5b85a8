"""A pcap: session on the default data path (tc): mirrors are direct-action cls_bpf filters that write
each frame into the sink's BPF ring buffer (ringfilter.py), no clone to the ifb sink.

    peer0 -- src0 (mirrored: clsact, vtap's cls_bpf filters)      the session's ifb sink (vtapc...)

Ring full and a ring unpinned behind vtap's back: test_tcx_pcap.py, on both data paths.
What is checked is what a user sees: the pcapng file (tshark), `status`, the sink's own counters
from the kernel (0: nothing was cloned to it), the filters `tc -s filter show` lists, the pins.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tc_lab import lab, new_marker  # noqa: F401 (lab: the fixture)
from test_capture import read_frames, wait_for
from test_tcx_datapath import pins
from test_tcx_pcap import client, frame, pcap_lab, sink_of, sink_packets  # noqa: F401 (pcap_lab: the fixture)
from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux import bpfring, tcnl, tcxmirror
from vtap_drivers.linux.capture import running_captures, stop_capture_process

SNAPLEN = 200


@pytest.fixture
def datapath():
    return "tc"


def ring_filters(lab, device, hook):
    """vtap's direct-action ring writers on a hook, as `tc filter show` lists them (name vtap:<mark>)."""
    return [line for line in lab.filter_handles(device, hook) if f"{tcnl.RING_NAME_PREFIX}" in line and "direct-action" in line]


def test_frames_land_byte_identical_both_directions_vlan_kept_snaplen_cut_and_no_clone(pcap_lab, tmp_path):
    lab, path = pcap_lab, tmp_path / "web.pcapng"
    marker = new_marker()
    inbound = [frame(marker, size) for size in (60, 150, 200, 201, 1400)] + [frame(marker, 300, vlan=42), frame(marker, 100, vlan=7)]
    outbound = [frame(marker, size, src=b"\x02\x00\x00\x00\x00\x09") for size in (64, 999)]
    with client(lab) as vtap:
        vtap.create_session("web", to=f"pcap:{path}", snaplen=SNAPLEN)
        vtap.add_flow("web", interface="src0", direction="both")
        sink = sink_of(lab)
        assert sorted(name.split("-")[0] for name in pins(lab)) == ["prog", "prog", "ring"]  # the sink's ring, its writers' programs
        assert all(os.stat(os.path.join(tcxmirror.pin_dir(lab.netns), name)).st_mode & 0o777 == 0o600 for name in pins(lab))
        assert len(ring_filters(lab, "src0", "ingress")) == 1 and len(ring_filters(lab, "src0", "egress")) == 1
        assert "mirred" not in lab.tc("filter", "show", "dev", "src0", "ingress").stdout

        lab.send("peer0", inbound)
        lab.send("src0", outbound)
        wanted = [(f[:SNAPLEN], len(f)) for f in inbound + outbound]
        assert wait_for(lambda: len(read_frames(path)) == len(wanted))
        assert sorted(read_frames(path)) == sorted(wanted)
        assert sink_packets(lab, sink) == 0  # nothing was cloned to the sink: every frame came through the ring

        rows = vtap.status()
        assert {row.state for row in rows} == {"active"}
        assert sum(row.packets for row in rows) == len(wanted) and {row.dropped for row in rows} == {0}
        (pid,) = [c["pid"] for c in running_captures(lab.state_dir).values()]

        vtap.delete_session("web")
    assert pins(lab) == []
    assert lab.filter_handles("src0", "ingress") == [] and lab.filter_handles("src0", "egress") == []
    assert "clsact" not in lab.qdiscs("src0")
    assert not wait_for(lambda: os.path.exists(f"/proc/{pid}"), timeout=0.5) or open(f"/proc/{pid}/stat").read().split()[2] in "ZX"
    assert running_captures(lab.state_dir) == {}
    assert lab.ip("-o", "link", "show", "type", "ifb").stdout == ""


def test_a_filter_after_vtaps_on_the_same_hook_still_sees_every_packet(pcap_lab, tmp_path):
    lab, path = pcap_lab, tmp_path / "next.pcapng"
    marker = new_marker()
    sent = [frame(marker, 100 + i) for i in range(25)]
    with client(lab) as vtap:
        vtap.create_session("next", to=f"pcap:{path}")
        vtap.add_flow("next", interface="src0", direction="in", filter="ether proto 0x88b5")
        # Someone else's filter, after vtap's (priority 7): it counts what reaches it.
        lab.tc("filter", "add", "dev", "src0", "ingress", "prio", "100", "protocol", "all", "bpf", "bytecode", "1,6 0 0 262144", "action", "mirred", "egress", "mirror", "dev", "mon0")
        lab.send("peer0", sent)
        assert wait_for(lambda: len(read_frames(path)) == len(sent))
        stats = lab.tc("-s", "filter", "show", "dev", "src0", "ingress", "prio", "100").stdout
        assert int(re.search(r"Sent \d+ bytes (\d+) pkt", stats).group(1)) >= len(sent)
        assert {row.state for row in vtap.status()} == {"active"}
        vtap.delete_session("next")
    assert ring_filters(lab, "src0", "ingress") == [] and len(lab.filter_handles("src0", "ingress")) == 1  # theirs stays
    assert pins(lab) == []


def test_a_port_target_on_tc_still_clones_with_mirred(pcap_lab):
    """Only pcap sinks get ring writers: a port: target keeps cls_bpf + mirred."""
    lab = pcap_lab
    with client(lab) as vtap:
        vtap.create_session("port", to="port:mon0")
        vtap.add_flow("port", interface="src0", direction="in")
        assert ring_filters(lab, "src0", "ingress") == [] and "mirred" in lab.tc("filter", "show", "dev", "src0", "ingress").stdout
        vtap.delete_session("port")


def test_orphans_are_found_and_removed_when_the_state_dir_is_lost(pcap_lab, tmp_path):
    lab, path = pcap_lab, tmp_path / "lost.pcapng"
    driver = lab.driver()
    session = TapSession("lost", f"pcap:{path}")
    driver.apply(driver.plan([session], [TapFlow("f", "lost", Source(interface="src0"), "both")]))
    assert len(ring_filters(lab, "src0", "ingress")) == 1 and len(ring_filters(lab, "src0", "egress")) == 1
    for name in running_captures(lab.state_dir):
        stop_capture_process(name, lab.state_dir)
    shutil.rmtree(lab.state_dir)
    driver = lab.driver()
    orphans = driver.observe()
    assert orphans and all(b.key.startswith("unknown/") for b in orphans)
    assert sum(1 for b in orphans if b.get("device") is None and b.key.endswith(tuple(m.split("-")[1] for m in pins(lab) if m.startswith("prog-")))) == 2
    driver.remove(orphans)
    assert driver.observe() == []
    assert lab.filter_handles("src0", "ingress") == [] and lab.filter_handles("src0", "egress") == []
    assert pins(lab) == [] and lab.ip("-o", "link", "show", "type", "ifb").stdout == ""


KILLED_APPLY = textwrap.dedent(
    """
    import os, signal, sys
    from vtap_core.model import Source, TapFlow, TapSession
    from vtap_drivers.linux import ringfilter
    from vtap_drivers.linux.driver import LinuxDriver
    ringfilter.pin = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # killed after the filters went in, before their pins
    driver = LinuxDriver(state_dir=sys.argv[1], netns=sys.argv[2], datapath="tc")
    session = TapSession("web", "pcap:" + sys.argv[3])
    driver.apply(driver.plan([session], [TapFlow("f", "web", Source(interface="src0"), "in")]))
    """
)


def test_killed_mid_apply_the_next_reconcile_finds_and_removes_everything(pcap_lab, tmp_path):
    lab = pcap_lab
    result = subprocess.run([sys.executable, "-c", KILLED_APPLY, lab.state_dir, lab.netns, str(tmp_path / "k.pcapng")], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert len(ring_filters(lab, "src0", "ingress")) == 1
    driver = lab.driver()
    found = driver.observe()
    assert sorted(b.key.split("/")[0] for b in found) == ["pcap", "tc"]
    plan = reconcile.reconcile(driver, [], [])
    assert len(plan.remove) == 2
    assert driver.observe() == []
    assert lab.filter_handles("src0", "ingress") == [] and pins(lab) == [] and running_captures(lab.state_dir) == {}
    assert lab.ip("-o", "link", "show", "type", "ifb").stdout == ""


def test_ring_writers_go_where_the_classic_filters_would_an_ingress_qdisc_and_an_htb_root(pcap_lab, tmp_path):
    """Someone's ingress qdisc (police filter at prio 50) and htb root, as Proxmox rate= puts them: the
    ingress ring writer sits on their ingress qdisc, the egress one on the htb root (parent 1:), and
    their shaping still carries every frame (the writer's verdict is TC_ACT_UNSPEC: classification goes on)."""
    from test_tc_hooks import pve_rate_limit

    lab, path = pcap_lab, tmp_path / "pve.pcapng"
    pve_rate_limit(lab, "src0", "htb")
    marker = new_marker()
    inbound = [frame(marker, 80 + i) for i in range(3)]
    outbound = [frame(marker, 90 + i, src=b"\x02\x00\x00\x00\x00\x09") for i in range(4)]
    driver = lab.driver()
    session = TapSession("pve", f"pcap:{path}")
    flows = [TapFlow("f", "pve", Source(interface="src0"), "both")]
    plan = reconcile.reconcile(driver, [session], flows)
    assert sorted(b.get("parent") or "" for b in plan.add if b.get("type") == "mirror") == ["", "1:"]
    assert all(b.get("sink") == "ring" for b in plan.add if b.get("type") == "mirror")
    assert "direct-action" in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout
    assert "direct-action" in lab.tc("filter", "show", "dev", "src0", "parent", "1:").stdout
    lab.send("peer0", inbound)
    lab.send("src0", outbound)
    assert wait_for(lambda: len(read_frames(path)) == len(inbound) + len(outbound))
    assert sorted(read_frames(path)) == sorted((f, len(f)) for f in inbound + outbound)
    assert " 0 pkt" not in lab.tc("-s", "class", "show", "dev", "src0").stdout  # htb still classified what src0 sent
    assert reconcile.reconcile(driver, [session], flows).empty  # read back as planned
    reconcile.reconcile(driver, [], [])
    assert "bpf" not in lab.tc("filter", "show", "dev", "src0", "parent", "1:").stdout
    assert "bpf" not in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout
    assert "pref 50 u32" in lab.tc("filter", "show", "dev", "src0", "parent", "ffff:").stdout
    assert pins(lab) == []


def test_on_a_kernel_without_bpf_ring_buffers_pcap_mirrors_clone_as_before(pcap_lab, tmp_path, monkeypatch):
    """Linux < 5.8 refuses BPF_MAP_TYPE_RINGBUF (EINVAL): the probe's map create is made to fail so."""
    from vtap_drivers.linux import ringfilter

    def refused(*args, **kwargs):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(bpfring, "create", refused)
    monkeypatch.setattr(ringfilter, "_ringbuf", [])
    lab, path = pcap_lab, tmp_path / "old.pcapng"
    marker = new_marker()
    with client(lab) as vtap:
        vtap.create_session("old", to=f"pcap:{path}")
        vtap.add_flow("old", interface="src0", direction="in")
        sink = sink_of(lab)
        assert pins(lab) == [] and ring_filters(lab, "src0", "ingress") == []
        assert "mirred" in lab.tc("filter", "show", "dev", "src0", "ingress").stdout
        sent = [frame(marker, size) for size in (60, 500)]
        lab.send("peer0", sent)
        assert wait_for(lambda: len(read_frames(path)) == len(sent))
        assert sink_packets(lab, sink) >= len(sent)  # cloned to the sink (the ring path leaves it at 0)
        assert {row.state for row in vtap.status()} == {"active"}
        vtap.delete_session("old")
    assert lab.filter_handles("src0", "ingress") == []
