"""The act_bpf action of a tc mirror to a pcap sink: the frame goes into the sink's BPF ring, no clone.

On the default tc data path a mirror is a cls_bpf classic filter with one
action carrying vtap's mark as its cookie. To a pcap sink that action is
mirred (a clone of the packet transmitted on the ifb sink, read there by
AF_PACKET) unless the ring can be used: then it is act_bpf (tc action kind
"bpf", a BPF_PROG_TYPE_SCHED_ACT program) running tcxprog's ring writer after
a match-everything classic program (cls_bpf did the matching): the record
format is bpfring's, a failed reserve counts in the program's per-CPU map
(third counter), and nothing is made or sent on the sink.

The program returns TC_ACT_UNSPEC (tcxprog's TCX_NEXT, the same -1): act_bpf
then answers the action's own control action, which vtap sets to
TC_ACT_UNSPEC as for mirred: "continue", so the filter gives no verdict and
later filters on the hook still see the packet; it is never dropped nor
redirected.
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
