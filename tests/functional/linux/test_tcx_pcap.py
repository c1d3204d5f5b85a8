"""A pcap: session on datapath=tcx: mirrors write frames into the sink's BPF ring buffer, no clone
(the tests marked @on_both_datapaths run on tc too, whose ring writers are direct-action cls_bpf
filters: test_tc_pcap_ring.py has the rest of tc's).

    peer0 -- src0 (mirrored: its tcx hooks)      the session's ifb sink (vtapc...): sends nothing

What is checked is what a user sees: the pcapng file (read back with tshark),
`status`, the sink's own counters from the kernel (0: no copy was ever cloned
to it), the pins in bpffs and the programs on the hooks.
"""

import json
import os
import signal
from dataclasses import replace

import pytest

from datapaths import on_both_datapaths, remove_pins
from tc_lab import lab, new_marker  # noqa: F401 (lab: the fixture)
from test_capture import read_frames, wait_for
from test_tcx_datapath import hook_programs, pins
from vtap_core.client import Client
from vtap_drivers.linux import bpfring, tcxmirror
from vtap_drivers.linux.capture import capture_counts, running_captures, stop_capture_process
from vtap_drivers.linux.dataplane import TcDataplane

SNAPLEN = 200


@pytest.fixture
def datapath():
    return "tcx"


@pytest.fixture
def pcap_lab(lab):
    """The standard lab; afterwards no capture process, and no pin of either data path's (test_tc_pcap_ring.py too)."""
    lab.standard()
    try:
        yield lab
    finally:
        for name in running_captures(lab.state_dir):
            stop_capture_process(name, lab.state_dir)
        for name in pins(lab):  # tc's ring writers' programs: pinned, with no link to detach
            if name.startswith(bpfring.WRITER_PREFIX):
                os.unlink(os.path.join(tcxmirror.pin_dir(lab.netns), name))
        remove_pins(lab.netns)


def client(lab):
    return Client(driver="linux", state=os.path.join(lab.state_dir, "vtap.db"), netns=lab.netns, datapath=lab.datapath)


def frame(marker, size, vlan=None, src=b"\x02\x00\x00\x00\x00\x01"):
    """An Ethernet frame of the local-experimental ethertype, `size` bytes without the tag."""
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    body = marker + bytes(range(256)) * (size // 256 + 1)
    return b"\xff" * 6 + src + tag + b"\x88\xb5" + body[: size - 14]


def sink_of(lab):
    (name,) = [line.split(":")[1].strip().split("@")[0] for line in lab.ip("-o", "link", "show", "type", "ifb").stdout.splitlines()]
    return name


def sink_packets(lab, name):
    """Packets the sink device saw: a copy mirred sends it is counted by the ifb (as rx, then dropped: a
    mirror is no redirect), so tx + rx is every clone that reached it."""
    (link,) = json.loads(lab.ip("-s", "-j", "link", "show", name).stdout)
    return link["stats64"]["tx"]["packets"] + link["stats64"]["rx"]["packets"]


def mirror_pins(lab):
    return [name for name in pins(lab) if not name.startswith(bpfring.PREFIX)]


def test_frames_land_byte_identical_both_directions_vlan_kept_snaplen_cut_and_no_clone(pcap_lab, tmp_path):
    lab, path = pcap_lab, tmp_path / "web.pcapng"
    marker = new_marker()
    inbound = [frame(marker, size) for size in (60, 150, 200, 201, 1400)] + [frame(marker, 300, vlan=42), frame(marker, 100, vlan=7)]
    outbound = [frame(marker, size, src=b"\x02\x00\x00\x00\x00\x09") for size in (64, 999)]
    with client(lab) as vtap:
        vtap.create_session("web", to=f"pcap:{path}", snaplen=SNAPLEN)
        vtap.add_flow("web", interface="src0", direction="both")
        sink = sink_of(lab)
        assert sorted(pins(lab))[-1] == bpfring.PREFIX + sink and len(mirror_pins(lab)) == 2
        assert os.stat(bpfring.ring_path(tcxmirror.pin_dir(lab.netns), sink)).st_mode & 0o777 == 0o600
        assert len(hook_programs(lab, "src0", "ingress")) == 1 and len(hook_programs(lab, "src0", "egress")) == 1
        assert "clsact" not in lab.qdiscs("src0")

        lab.send("peer0", inbound)  # src0 receives them: the tag goes into skb metadata before tcx ingress
        lab.send("src0", outbound)
        wanted = [(f[:SNAPLEN], len(f)) for f in inbound + outbound]
        assert wait_for(lambda: len(read_frames(path)) == len(wanted))
        assert sorted(read_frames(path)) == sorted(wanted)
        assert sink_packets(lab, sink) == 0  # nothing was cloned to the sink: every frame came through the ring

        assert wait_for(lambda: (capture_counts(lab.state_dir, sink) or {}).get("bpf_ring_frames") == len(wanted))  # the stats file
        rows = vtap.status()
        assert {row.state for row in rows} == {"active"}
        assert sum(row.packets for row in rows) == len(wanted) and {row.dropped for row in rows} == {0}
        (pid,) = [c["pid"] for c in running_captures(lab.state_dir).values()]

        vtap.delete_session("web")
    assert pins(lab) == []
    assert hook_programs(lab, "src0", "ingress") == [] and hook_programs(lab, "src0", "egress") == []
    assert not wait_for(lambda: os.path.exists(f"/proc/{pid}"), timeout=0.5) or open(f"/proc/{pid}/stat").read().split()[2] in "ZX"
    assert running_captures(lab.state_dir) == {}
    assert lab.ip("-o", "link", "show", "type", "ifb").stdout == ""


def test_a_mirror_that_fell_back_to_cls_bpf_still_lands_in_the_file_beside_the_ring_ones(pcap_lab, tmp_path):
    """What a filter the translator refuses leaves: a cls_bpf + mirred mirror to the same sink. No libpcap
    expression both fails translation and passes the kernel's classic checker (protochain's backward jump
    fails both), so the fallback mirror is planned by a datapath=tc dataplane of the same state dir."""
    from vtap_core.model import Source, TapFlow, TapSession

    lab, path = pcap_lab, tmp_path / "mixed.pcapng"
    marker = new_marker()
    session = TapSession("mix", f"pcap:{path}")
    ring_flow = TapFlow("ring", "mix", Source(interface="src0"), "in", "ether[12:2] = 0x88b5")
    clone_flow = TapFlow("clone", "mix", Source(interface="src0"), "out", "ether[12:2] = 0x88b5")
    tcx_dp, tc_dp = lab.dataplane(), TcDataplane(netns=lab.netns, state_dir=lab.state_dir, datapath="tc")
    try:
        ring_bindings = tcx_dp.plan_interface(session, ring_flow)
        (clone_mirror,) = [b for b in tc_dp.plan_interface(session, clone_flow) if b.get("type") == "mirror"]
        # datapath=tc writes into the ring too where it translates (ringfilter.py): the clone is what it plans where not
        clone_mirror = replace(clone_mirror, spec=tuple(pair for pair in clone_mirror.spec if pair[0] not in ("sink", "snaplen")))
        assert [b.get("sink") for b in ring_bindings] == [None, "ring"] and clone_mirror.get("datapath") is None
        tcx_dp.apply(ring_bindings)
        tc_dp.apply([clone_mirror])
        assert len(mirror_pins(lab)) == 1 and len(lab.filter_handles("src0", "egress")) == 1

        ring_frames = [frame(marker, 120), frame(marker, 80)]
        clone_frames = [frame(marker, 90, src=b"\x02\x00\x00\x00\x00\x09")]
        lab.send("peer0", ring_frames)
        lab.send("src0", clone_frames)
        assert wait_for(lambda: len(read_frames(path)) == 3)
        assert sorted(read_frames(path)) == sorted((f, len(f)) for f in ring_frames + clone_frames)
        assert sink_packets(lab, sink_of(lab)) == 1  # only the cls_bpf mirror's copy went through the sink
        tc_dp.remove([clone_mirror])
        tcx_dp.remove(ring_bindings)
    finally:
        tc_dp.close()
    assert pins(lab) == [] and running_captures(lab.state_dir) == {}


@on_both_datapaths
def test_ring_full_with_the_reader_stopped_every_lost_copy_is_dropped_and_every_written_one_is_in_the_file(pcap_lab, tmp_path, monkeypatch):
    lab, path = pcap_lab, tmp_path / "full.pcapng"
    monkeypatch.setenv(bpfring.RING_BYTES_ENV, str(4 * bpfring.PAGE))
    marker = new_marker()
    sent = [frame(marker, 200 + i % 50) for i in range(400)]  # ~100 KB of records for a 16 KB ring
    with client(lab) as vtap:
        vtap.create_session("full", to=f"pcap:{path}")
        vtap.add_flow("full", interface="src0", direction="in")
        (pid,) = [c["pid"] for c in running_captures(lab.state_dir).values()]
        os.kill(pid, signal.SIGSTOP)  # the reader stops for real: the ring fills
        try:
            lab.send("peer0", sent)
            (row,) = vtap.status()
            assert row.packets + row.dropped == len(sent)
            assert 0 < row.packets < len(sent) and row.capture_dropped == row.dropped
            assert f"{row.dropped} copies dropped" in (row.problem or "")
        finally:
            os.kill(pid, signal.SIGCONT)
        sink = sink_of(lab)
        assert wait_for(lambda: (capture_counts(lab.state_dir, sink) or {}).get("bpf_ring_dropped") == row.dropped)  # the stats file
        assert capture_counts(lab.state_dir, sink)["bpf_ring_frames"] == row.packets
        more = [frame(marker, 100) for _ in range(20)]  # fit in the emptied ring
        os.kill(pid, signal.SIGSTOP)
        lab.send("peer0", more)
        os.kill(pid, signal.SIGCONT)
        vtap.delete_session("full")  # SIGTERM at once: the process drains the ring before it closes the file
    assert sorted(read_frames(path)) == sorted((f, len(f)) for f in sent[: row.packets] + more)
    assert pins(lab) == [] and running_captures(lab.state_dir) == {}


def test_an_orphan_ring_is_found_and_removed(pcap_lab, tmp_path):
    lab = pcap_lab
    directory = tcxmirror.pin_dir(lab.netns)
    tcxmirror._private_dir(directory)
    path = bpfring.ring_path(directory, "vtapcgone")
    bpfring.ensure(path)
    driver = lab.driver(datapath="tcx")
    (orphan,) = driver.observe()
    assert orphan.key == f"unknown/{lab.netns}/ring-vtapcgone"
    from vtap_core import reconcile

    reconcile.reconcile(driver, [], [])
    assert pins(lab) == [] and driver.observe() == []


@on_both_datapaths
def test_a_ring_unpinned_behind_vtaps_back_is_drift_and_reconcile_brings_the_copies_back(pcap_lab, tmp_path):
    lab, path = pcap_lab, tmp_path / "again.pcapng"
    marker = new_marker()
    with client(lab) as vtap:
        vtap.create_session("again", to=f"pcap:{path}")
        vtap.add_flow("again", interface="src0", direction="in")
        first = [frame(marker, 90) for _ in range(3)]
        lab.send("peer0", first)
        assert wait_for(lambda: len(read_frames(path)) == 3)
        os.unlink(bpfring.ring_path(tcxmirror.pin_dir(lab.netns), sink_of(lab)))  # the mirror and the capture keep the old ring
        (row,) = vtap.status()
        assert row.state != "active"  # its ring is not the one its sink should have: copies may reach no file
        vtap.reconcile()
        (row,) = vtap.status()
        assert row.state == "active"
        second = [frame(marker, 95) for _ in range(4)]
        lab.send("peer0", second)
        assert wait_for(lambda: len(read_frames(path)) == 7)
        assert sorted(read_frames(path)) == sorted((f, len(f)) for f in first + second)
        vtap.delete_session("again")
    assert pins(lab) == [] and running_captures(lab.state_dir) == {}


def test_where_plain_accesses_order_nothing_sinks_get_no_ring_and_the_mirrors_clone(pcap_lab, tmp_path, monkeypatch):
    # The reader's positions rely on x86's ordering (bpfring.py): elsewhere the frames take the clone path.
    monkeypatch.setattr(bpfring.platform, "machine", lambda: "aarch64")
    lab, path = pcap_lab, tmp_path / "web.pcapng"
    marker = new_marker()
    with client(lab) as vtap:
        vtap.create_session("web", to=f"pcap:{path}")
        vtap.add_flow("web", interface="src0", direction="in")
        sink = sink_of(lab)
        assert not any(name.startswith(bpfring.PREFIX) for name in pins(lab)) and len(mirror_pins(lab)) == 1
        sent = [frame(marker, size) for size in (60, 500)]
        lab.send("peer0", sent)
        assert wait_for(lambda: len(read_frames(path)) == len(sent))
        assert sink_packets(lab, sink) == 2 * len(sent)  # cloned to the sink, as on datapath=tc (the ifb counts a copy as tx and rx)
        assert {row.state for row in vtap.status()} == {"active"}
        vtap.delete_session("web")
    assert pins(lab) == []
