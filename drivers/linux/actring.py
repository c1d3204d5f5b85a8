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
then answers the action's own control action (net/sched/act_bpf.c), which
filter_request sets to TC_ACT_UNSPEC as for mirred: "continue", so the filter
gives no verdict and later filters on the hook still see the packet; it is
never dropped nor redirected. (tc's own default for "action bpf" is "pipe",
which ends classification at the last action: later filters never run.)

The action is read back from a dump of kind "bpf" (read_actions): its cookie
(vtap's mark), its program's id (whose maps say which ring it writes and
where its ring-full count is) and the packets it ran on.

Not wired into the tc data path: this machine's kernel has no act_bpf, and the
measurement (bench/results/capture_sink_ring.txt) did not reach the target.
"""

from __future__ import annotations

import struct

from vtap_drivers.linux import bpfsys, tcnl, tcxprog
from vtap_drivers.linux.nlsock import ATTR, NLA_TYPE_MASK, find

# linux/tc_act/tc_bpf.h
TCA_ACT_BPF_PARMS, TCA_ACT_BPF_FD, TCA_ACT_BPF_NAME, TCA_ACT_BPF_ID = 2, 5, 6, 9
ACT_BPF_PARMS = struct.Struct("=IIiii")  # tc_gen: index, capab, action, refcnt, bindcnt

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


def filter_request(ifindex: int, hook: str, prio: int, program, prog: bpfsys.BpfFd, cookie: bytes, parent: int | None = None, handle: int = 0) -> bytes:
    """RTM_NEWTFILTER body: bpf(program) -> act_bpf running prog, cookie, continue (tcnl.mirror_filter_request's shape)."""
    action = (
        tcnl.pack_attr(tcnl.TCA_ACT_KIND, b"bpf\0")
        + tcnl.pack_attr(
            tcnl.TCA_ACT_OPTIONS | tcnl.NLA_F_NESTED,
            tcnl.pack_attr(TCA_ACT_BPF_PARMS, ACT_BPF_PARMS.pack(0, 0, tcnl.TC_ACT_UNSPEC, 0, 0))
            + tcnl.pack_attr(TCA_ACT_BPF_FD, struct.pack("=I", prog.fileno()))
            + tcnl.pack_attr(TCA_ACT_BPF_NAME, PROGRAM_IDENTIFIER.encode() + b"\0"),
        )
        + tcnl.pack_attr(tcnl.TCA_ACT_COOKIE, cookie)
    )
    options = tcnl.pack_attr(tcnl.TCA_BPF_ACT | tcnl.NLA_F_NESTED, tcnl.pack_attr(1 | tcnl.NLA_F_NESTED, action)) + tcnl._bpf_ops(tuple(map(tuple, program)))
    header = tcnl.TCMSG.pack(0, 0, 0, ifindex, handle, parent or tcnl.HOOK_PARENT[hook], tcnl.filter_info(prio))
    return header + tcnl.BPF_KIND + tcnl.pack_attr(tcnl.TCA_OPTIONS | tcnl.NLA_F_NESTED, options)


def dump_request() -> bytes:
    """RTM_GETACTION body: a dump of every act_bpf action (filter-bound ones included), replies filled."""
    kind = tcnl.pack_attr(1 | tcnl.NLA_F_NESTED, tcnl.pack_attr(tcnl.TCA_ACT_KIND, b"bpf\0"))
    large = struct.pack("=II", tcnl.TCA_ACT_FLAG_LARGE_DUMP_ON, tcnl.TCA_ACT_FLAG_LARGE_DUMP_ON)  # nla_bitfield32: value, selector
    return struct.pack("=BBH", 0, 0, 0) + tcnl.pack_attr(tcnl.TCA_ROOT_TAB | tcnl.NLA_F_NESTED, kind) + tcnl.pack_attr(tcnl.TCA_ROOT_FLAGS, large)


def read_actions(data, start: int, end: int) -> list[tuple]:
    """(cookie, program id, packets, bytes) of each act_bpf action with a 16-byte cookie in one dump reply."""
    tab = find(data, start + tcnl.TCAMSG_SIZE, end, tcnl.TCA_ROOT_TAB)
    out = []
    if tab is None:
        return out
    offset, tab_end = tab
    while offset + 4 <= tab_end:
        length, _index = ATTR.unpack_from(data, offset)
        if length < 4:
            break
        at, action_end = offset + 4, offset + length
        offset += (length + 3) & ~3
        kind = cookie = prog_id = None
        packets = nbytes = 0
        while at + 4 <= action_end:
            size, attr = ATTR.unpack_from(data, at)
            if size < 4:
                break
            attr &= NLA_TYPE_MASK
            if attr == tcnl.TCA_ACT_KIND:
                kind = bytes(data[at + 4 : at + size])
            elif attr == tcnl.TCA_ACT_COOKIE:
                cookie = bytes(data[at + 4 : at + size])
            elif attr == tcnl.TCA_ACT_OPTIONS:
                found = find(data, at + 4, at + size, TCA_ACT_BPF_ID)
                prog_id = struct.unpack_from("=I", data, found[0])[0] if found else None
            elif attr == tcnl.TCA_ACT_STATS:
                packets, nbytes, _ = tcnl.mirred_stats(data, at + 4, at + size)
            at += (size + 3) & ~3
        if kind == b"bpf\0" and cookie is not None and len(cookie) == tcnl.COOKIE_BYTES:
            out.append((cookie, prog_id, packets, nbytes))
    return out
