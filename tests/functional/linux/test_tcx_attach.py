"""The translated program on a real tcx hook: copies arrive, others' programs still run, pins and cleanup.

src0 receives what peer0 sends (its tcx ingress hook is where vtap's program
sits); copies go out of mon0 and are counted on mon1. At ingress the kernel has
already moved an 802.1Q tag into skb metadata, so "vlan 10 and ip" is decided by
the ancillary loads the translator maps to __sk_buff (TEST_RUN cannot show that).
"""

import errno
import os
import socket
import struct
import subprocess
import time
import uuid

import pytest
from pyroute2 import netns as pr_netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from vtap_core import filters
from vtap_drivers.linux import bpfsys, tcxprog

NO_SUCH_IFINDEX = 0x7FFFFFF0


def frames(marker, vlan=None, count=1):
    tag = [Dot1Q(vlan=vlan)] if vlan else []
    out = []
    for index in range(count):
        layers = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        for extra in tag:
            layers = layers / extra
        out.append(bytes(layers / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000 + index, dport=9) / marker))
    return out


@pytest.fixture
def inside(lab):
    """bpf(2) resolves ifindexes in the calling thread's namespace: enter the lab's for the test."""
    lab.standard()
    pr_netns.pushns(lab.netns)
    try:
        yield lab
    finally:
        pr_netns.popns()


def test_mirror_copies_matching_frames_and_lets_later_programs_run(inside, tmp_path):
    lab = inside
    src0, mon0 = socket.if_nametoindex("src0"), socket.if_nametoindex("mon0")
    bpfsys.ensure_bpffs()
    pin_path = f"{bpfsys.BPFFS}/vtapt-{uuid.uuid4().hex[:8]}"
    marker = new_marker()
    wanted, other_vlan, untagged = frames(marker, 10, 5), frames(marker, 20, 3), frames(marker, None, 2)
    try:
        with tcxprog.load_mirror(filters.compile_filter("vlan 10 and ip"), mon0, "att") as mirror, \
                tcxprog.load_mirror(filters.compile_filter(""), NO_SUCH_IFINDEX, "watch") as watcher:
            link = bpfsys.attach_tcx(mirror.prog, src0, "ingress")
            watcher_link = bpfsys.attach_tcx(watcher.prog, src0, "ingress")  # runs after vtap's
            mirror_id, watcher_id = bpfsys.prog_info(mirror.prog).id, bpfsys.prog_info(watcher.prog).id
            hook = bpfsys.query_tcx(src0, "ingress")
            assert hook.prog_ids == (mirror_id, watcher_id)
            assert hook.link_ids == (bpfsys.link_info(link).id, bpfsys.link_info(watcher_link).id)
            assert bpfsys.query_tcx(src0, "ingress", capacity=1) == hook  # asks again with room for all

            sock = lab.packet_socket("mon1")
            try:
                lab.send("peer0", wanted + other_vlan + untagged)
                copies = receive(sock, marker)
            finally:
                sock.close()
            assert len(copies) == 5
            assert all(struct.unpack("!HH", copy[12:16]) == (0x8100, 10) for copy in copies)
            counters = mirror.read_counters()
            # ingress: the tag is metadata, not frame bytes, so skb->len is 4 shorter.
            assert counters == {"packets": 5, "bytes": sum(len(f) - 4 for f in wanted), "clone_failures": 0}
            assert watcher.read_counters()["packets"] == 10  # saw every frame: vtap's returned TCX_NEXT

            bpfsys.pin(link, pin_path)
            assert oct(os.stat(pin_path).st_mode & 0o777) == "0o600"
            link.close()
            watcher_link.close()  # not pinned: closing its last fd detaches it
        # every fd closed; the pinned link holds vtap's program on the hook
        hook = bpfsys.query_tcx(src0, "ingress")
        assert hook.prog_ids == (mirror_id,)
        with bpfsys.link_by_id(hook.link_ids[0]) as found:
            info = bpfsys.link_info(found)
            assert (info.type, info.ifindex, info.attach_type, info.prog_id) == (bpfsys.LINK_TYPE_TCX, src0, bpfsys.TCX_INGRESS, mirror_id)
        with bpfsys.prog_by_id(mirror_id) as prog:
            info = bpfsys.prog_info(prog)
            assert info.name == "vtap_att" and len(info.map_ids) == 1
        with bpfsys.map_by_id(info.map_ids[0]) as counters_map:
            assert tcxprog.read_counters(counters_map)["packets"] == 5

        sock = lab.packet_socket("mon1")
        try:
            lab.send("peer0", wanted[:1])
            assert len(receive(sock, marker)) == 1  # still mirroring with no fd open
            with bpfsys.get_pinned(pin_path) as pinned:
                bpfsys.detach_link(pinned)
            os.unlink(pin_path)
            assert bpfsys.query_tcx(src0, "ingress").prog_ids == ()
            lab.send("peer0", wanted[:1])
            assert receive(sock, marker, first=0.5) == []
        finally:
            sock.close()
    finally:
        if os.path.lexists(pin_path):
            os.unlink(pin_path)
    with pytest.raises(OSError) as gone:
        bpfsys.get_pinned(pin_path)
    assert gone.value.errno == errno.ENOENT
    assert _freed(lambda: bpfsys.prog_by_id(mirror_id)), "the program outlived its last link, pin and fd"
    assert _freed(lambda: bpfsys.map_by_id(info.map_ids[0])), "the counters map outlived its program"


def _freed(open_by_id, within: float = 5.0) -> bool:
    """Whether the object's id stops resolving (the kernel frees bpf objects after an RCU grace period)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            open_by_id().close()
        except OSError as error:
            return error.errno == errno.ENOENT
        time.sleep(0.05)
    return False


def test_egress_hook_and_copy_into_target_ingress(inside):
    """Frames src0 sends (its egress) are copied into mon1's ingress (BPF_F_INGRESS) and seen there."""
    lab = inside
    src0, mon1 = socket.if_nametoindex("src0"), socket.if_nametoindex("mon1")
    marker = new_marker()
    with tcxprog.load_mirror(filters.compile_filter("udp port 9"), mon1, "egr", to_ingress=True) as mirror:
        with bpfsys.attach_tcx(mirror.prog, src0, "egress") as link:
            assert bpfsys.link_info(link).attach_type == bpfsys.TCX_EGRESS
            sock = lab.packet_socket("mon1")
            try:
                lab.send("src0", frames(marker, None, 4))
                assert len(receive(sock, marker)) == 4
            finally:
                sock.close()
            assert mirror.read_counters()["packets"] == 4
        assert bpfsys.query_tcx(src0, "egress").prog_ids == ()  # closing the link's only fd detached it


def test_bpffs_is_mounted_where_asked(tmp_path):
    """ensure_bpffs mounts bpffs (mount(2)) on a directory that has none, private to root; pins work there."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts bpffs")
    where = str(tmp_path / "bpf")
    bpfsys.ensure_bpffs(where)
    try:
        assert oct(os.stat(where).st_mode & 0o777) == "0o700"
        with tcxprog.load_mirror(filters.compile_filter("", live=False), NO_SUCH_IFINDEX, "pin") as mirror:
            bpfsys.pin(mirror.prog, f"{where}/prog")
        with bpfsys.get_pinned(f"{where}/prog") as prog:
            assert bpfsys.prog_info(prog).name == "vtap_pin"
        bpfsys.ensure_bpffs(where)  # already there: nothing stacked on top
        assert sum(line.split()[1] == where for line in open("/proc/self/mounts")) == 1
    finally:
        subprocess.run(["umount", where], check=False)


def test_a_vanished_target_counts_clone_failures_and_traffic_flows_on(inside):
    """The target device is deleted under a live program: clones fail (counted), frames still reach src0."""
    lab = inside
    src0, mon0 = socket.if_nametoindex("src0"), socket.if_nametoindex("mon0")
    marker = new_marker()
    with tcxprog.load_mirror(filters.compile_filter("udp port 9"), mon0, "gone") as mirror, \
            bpfsys.attach_tcx(mirror.prog, src0, "ingress"):
        lab.ip("link", "del", "mon0")
        sock = lab.packet_socket("src0")
        try:
            lab.send("peer0", frames(marker, None, 3))
            assert len(receive(sock, marker)) == 3
        finally:
            sock.close()
        assert mirror.read_counters()["clone_failures"] == 3
        assert mirror.read_counters()["packets"] == 3
