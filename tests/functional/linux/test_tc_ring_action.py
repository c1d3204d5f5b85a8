"""The act_bpf ring action (actring.py: a tc mirror to a pcap sink without a clone) run by the kernel.

BPF_PROG_TEST_RUN runs the SCHED_ACT program on frames against a real BPF ring
buffer; the records are read back with bpfring.RingReader, written as pcapng and
read with tshark. Its verdict must be TC_ACT_UNSPEC for every frame: act_bpf then
answers the action's control action ("continue", as mirred's): never a drop
nor a redirect, and later filters still run. This needs no act_bpf in the kernel
(only the program type), so it runs where the action itself cannot be added.
"""

import os

import pytest

from test_tcx_ring import drain_to_file, ring_at, udp_frame  # noqa: F401 (ring_at: a fixture)
from vtap_drivers.linux import actring, bpfring, bpfsys, tcnl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads eBPF programs and ring buffers (bpf(2))")


def load(reader, snaplen=None):
    return actring.load(reader.ring, snaplen, bpfring.DIRECTION_IN)


def test_the_program_is_an_action_that_writes_every_frame_whole_and_always_continues(ring_at, tmp_path):
    reader = bpfring.RingReader(ring_at())
    sent = [udp_frame(9, b"m" * size) for size in (18, 100, 1000, 1400)]
    with load(reader) as action:
        assert bpfsys.prog_info(action.prog).type == bpfsys.PROG_TYPE_SCHED_ACT
        assert [bpfsys.run_on_frame(action.prog, frame).retval for frame in sent] == [tcnl.TC_ACT_UNSPEC] * len(sent)
        counters = action.read_counters()
    assert counters == {"packets": 4, "bytes": sum(map(len, sent)), "clone_failures": 0}
    assert drain_to_file(reader, tmp_path / "all.pcapng") == [(frame, len(frame)) for frame in sent]
    reader.close()


def test_snaplen_cuts_the_record_and_keeps_the_length_on_the_wire(ring_at, tmp_path):
    reader = bpfring.RingReader(ring_at(), snaplen=100)
    sent = [udp_frame(9, b"s" * size) for size in (10, 500, 3000)]
    with load(reader, snaplen=100) as action:
        for frame in sent:
            bpfsys.run_on_frame(action.prog, frame)
    assert drain_to_file(reader, tmp_path / "snap.pcapng", snaplen=100) == [(frame[:100], len(frame)) for frame in sent]
    reader.close()


def test_a_full_ring_counts_each_lost_frame_and_still_continues(ring_at, tmp_path):
    reader = bpfring.RingReader(ring_at(bpfring.PAGE))  # one page: a few records fit
    sent = [udp_frame(9, bytes([i]) * 60) for i in range(100)]
    with load(reader) as action:
        verdicts = {bpfsys.run_on_frame(action.prog, frame).retval for frame in sent}
        counters = action.read_counters()
    assert verdicts == {tcnl.TC_ACT_UNSPEC}  # a full ring drops the copy, never the packet
    assert 0 < counters["packets"] < len(sent)
    assert counters["packets"] + counters["clone_failures"] == len(sent)
    assert drain_to_file(reader, tmp_path / "full.pcapng") == [(frame, len(frame)) for frame in sent[: counters["packets"]]]
    reader.close()


def test_a_kernel_without_act_bpf_refuses_the_filter_whole_and_dumps_no_action(ring_at, netns):
    """Where act_bpf is missing (this machine's kernel: CONFIG_NET_ACT_BPF unset) the filter add fails with
    ENOENT and leaves nothing behind: the case where a pcap mirror must stay on mirred."""
    import errno
    import subprocess

    from vtap_drivers.linux.dataplane import CREATE, DUMP, RTM_GETACTION, RTM_NEWQDISC, RTM_NEWTFILTER
    from vtap_drivers.linux.nlsock import RtnlSocket

    subprocess.run(["ip", "-n", netns, "link", "add", "src0", "type", "veth", "peer", "name", "peer0"], check=True)
    src0 = int(subprocess.run(["ip", "-n", netns, "-o", "link", "show", "src0"], capture_output=True, text=True, check=True).stdout.split(":")[0])
    nl = RtnlSocket(netns)
    reader = bpfring.RingReader(ring_at())
    try:
        assert nl.requests([(tcnl.qdisc_request(src0), RTM_NEWQDISC, CREATE)]) == [None]
        with load(reader) as action:
            request = actring.filter_request(src0, "ingress", 1, actring.MATCH_ALL, action.prog, b"m" * 16, handle=7)
            (failure,) = nl.requests([(request, RTM_NEWTFILTER, CREATE)])
        if failure is None:
            pytest.skip("this kernel has act_bpf: the lane's tests/kernel/test_act_ring.py runs it")
        assert failure.code == errno.ENOENT and "action module" in failure.text
        shown = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", "src0", "ingress"], capture_output=True, text=True, check=True).stdout
        assert shown.strip() == ""
        assert [a for reply in nl.dump(actring.dump_request(), RTM_GETACTION, DUMP) for a in actring.read_actions(*reply)] == []
    finally:
        reader.close()
        nl.close()
