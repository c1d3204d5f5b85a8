"""For bench/capture_sink.py: an act_bpf program writing each frame into a pcap sink's BPF ring (no clone).

An idea measured for the default tc data path and not built into it: keep the
cls_bpf classic filter with one action carrying vtap's mark as its cookie, but
make that action act_bpf (tc action kind "bpf", a BPF_PROG_TYPE_SCHED_ACT
program) running tcxprog's ring writer after a match-everything classic
program (cls_bpf did the matching) instead of mirred to the ifb sink.

The program returns TC_ACT_UNSPEC (tcxprog's TCX_NEXT, the same -1): act_bpf
then answers the action's own control action (net/sched/act_bpf.c), which
must be set to TC_ACT_UNSPEC as for mirred: "continue", so the filter
gives no verdict and later filters on the hook still see the packet; it is
never dropped nor redirected. (tc's own default for "action bpf" is "pipe",
which ends classification at the last action: later filters never run.)

Not built into the tc data path: this machine's kernel has no act_bpf, and in
Debian's kernel (the lane, bench/capture_sink_lane.py) it keeps 0.75 of no-tap,
against 0.79-0.81 for the same ring writer as a direct-action cls_bpf filter.
"""

from __future__ import annotations

from vtap_drivers.linux import bpfsys, tcxprog

MATCH_ALL = ((0x06, 0, 0, 0xFFFFFFFF),)  # classic "ret #-1": the filter in front already matched
PROGRAM_IDENTIFIER = "pcapring"


def load(ring: bpfsys.BpfFd, snaplen: int | None, direction: int) -> tcxprog.MirrorProgram:
    """The action's program writing into `ring` (records of at most snaplen bytes; direction as RingAction's)
    and its counters map (packets, bytes, ring full)."""
    name = tcxprog.program_name(PROGRAM_IDENTIFIER)
    counters = bpfsys.create_percpu_array(name, 8 * len(tcxprog.COUNTERS))
    try:
        code = tcxprog.translate(MATCH_ALL, counters.fileno(), 0, ring=tcxprog.RingAction(ring.fileno(), snaplen, direction))
        prog = bpfsys.load_program(code, name, prog_type=bpfsys.PROG_TYPE_SCHED_ACT)
    except BaseException:
        counters.close()
        raise
    return tcxprog.MirrorProgram(prog, counters)
