"""Netlink bodies for the one tc shape vtap uses: cls_bpf (classic ops) + mirred, with a cookie.

Requests are packed here attribute by attribute (struct tcmsg / ifinfomsg,
then type-length-value attributes): classic ops are an array of struct
sock_filter {u16 code; u8 jt; u8 jf; u32 k} with their count in
TCA_BPF_OPS_LEN (u16), which pyroute2's tcmsg plugin declares as a uint32,
and pyroute2's action map stops before TCA_ACT_COOKIE, where vtap keeps its
mark. Packing by hand is also what keeps a thousand filters fast. The other shape, a pcap
mirror's ring writer on datapath=tc (ringfilter.py), is a direct-action cls_bpf filter
running an eBPF program; having no action, it carries the mark in its name ("vtap:" + hex).

Replies are read by nlsock's attribute walker (read_* below): only the few
attributes vtap needs are decoded.
"""

from __future__ import annotations

import functools
import socket
import struct
import sys

from vtap_drivers.linux.nlsock import ATTR, NLA_TYPE_MASK, attributes, find, pick, string, u32

# linux/pkt_sched.h, linux/pkt_cls.h, linux/tc_act/tc_mirred.h
TC_H_CLSACT = 0xFFFFFFF1  # == TC_H_INGRESS: clsact and ingress qdiscs sit in the same place
TC_H_ROOT = 0xFFFFFFFF
HOOK_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
TC_ACT_UNSPEC = -1  # "continue": later filters on the hook still see the packet
TCA_EGRESS_MIRROR = 2
COOKIE_BYTES = 16  # TC_COOKIE_MAX_SIZE
NLA_F_NESTED = 0x8000

# Attribute numbers (linux/rtnetlink.h, pkt_cls.h, tc_act/tc_mirred.h, gen_stats.h, if_link.h).
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_ACT, TCA_BPF_OPS_LEN, TCA_BPF_OPS = 1, 4, 5
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
RING_NAME_PREFIX = "vtap:"  # a direct-action ring filter's TCA_BPF_NAME: "vtap:" + mark hex (it has no action to carry a cookie)
TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_ACT_STATS, TCA_ACT_COOKIE = 1, 2, 4, 6
TCA_MIRRED_PARMS = 2
TCA_STATS_BASIC, TCA_STATS_QUEUE, TCA_STATS_PKT64 = 1, 3, 8
TCA_ROOT_TAB, TCA_ROOT_FLAGS = 1, 2
TCA_ACT_FLAG_LARGE_DUMP_ON = 1  # fill each reply (not 32 actions per reply)
TCA_INGRESS_BLOCK, TCA_EGRESS_BLOCK = 13, 14
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_STATS64 = 3, 4, 18, 20, 23
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_GROUP, IFLA_VXLAN_PORT, IFLA_VXLAN_GROUP6 = 1, 2, 15, 16
IFLA_VXLAN_LOCAL, IFLA_VXLAN_LOCAL6 = 4, 17

ACTION_ATTRIBUTES = frozenset({TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_ACT_STATS, TCA_ACT_COOKIE})  # what read_mirred reads
BLOCK_ATTRIBUTES = frozenset({TCA_INGRESS_BLOCK, TCA_EGRESS_BLOCK})
MARK_ALIAS = b"vtap:"  # catalog.MARK_PREFIX: how vtap's own devices' aliases begin
LINK_ATTRIBUTES = frozenset({IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_STATS64})  # what read_link reads
TCMSG = struct.Struct("=BBHiIII")  # family, pad, pad, ifindex, handle, parent, info
TCAMSG_SIZE = 4
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
MIRRED_PARMS = struct.Struct("=IIiiiiI")  # index, capab, action, refcnt, bindcnt, eaction, ifindex
BASIC_STATS = struct.Struct("=QI")  # struct gnet_stats_basic: bytes, packets (32 bits)
U64 = struct.Struct("=Q")
QUEUE_STATS = struct.Struct("=IIIII")  # struct gnet_stats_queue: qlen, backlog, drops, requeues, overlimits
LINK_STATS64 = struct.Struct("=8Q")  # struct rtnl_link_stats64, first 8: rx/tx packets, rx/tx bytes, rx/tx errors, rx/tx dropped


def filter_info(prio: int) -> int:
    """tcm_info of a filter: priority in the high half, protocol (network order) in the low."""
    return (prio << 16) | socket.htons(ETH_P_ALL)


def pack_ops(program) -> bytes:
    return b"".join(struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in program)


@functools.lru_cache(maxsize=1024)
def _bpf_ops(program) -> bytes:
    """The TCA_BPF_OPS_LEN and TCA_BPF_OPS attributes of a program: thousands of filters share a few programs."""
    return pack_attr(TCA_BPF_OPS_LEN, struct.pack("=H", len(program))) + pack_attr(TCA_BPF_OPS, pack_ops(program))


def pack_attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


BPF_KIND = pack_attr(TCA_KIND, b"bpf\0")


# ---------------------------------------------------------------- requests


def parse_handle(text: str) -> int:
    """A qdisc handle as tc writes it ("1:") as the kernel's number."""
    return int(text.rstrip(":") or "0", 16) << 16


def format_handle(handle: int) -> str:
    return f"{handle >> 16:x}:"


def handle_for(mark: bytes) -> int:
    """The filter handle vtap asks for when it adds the filter of this mark (a u32 of its digest, never 0).

    Knowing where its filter sits lets observe() get each one by handle (many
    per send) instead of dumping every hook: a dump is a send and two reads.
    """
    return int.from_bytes(mark[-4:], "big") or 1


def mirror_filter_request(ifindex: int, hook: str, prio: int, program, to_ifindex: int, cookie: bytes, parent: int | None = None, handle: int = 0) -> bytes:
    """RTM_NEWTFILTER body: bpf(program) -> mirred egress mirror to_ifindex, cookie, continue.

    parent: the hook's clsact parent, unless another qdisc is given (the handle of a root qdisc).
    handle: the filter's handle (0: the kernel picks one).
    """
    parms = MIRRED_PARMS.pack(0, 0, TC_ACT_UNSPEC, 0, 0, TCA_EGRESS_MIRROR, to_ifindex)
    mirred = (
        pack_attr(TCA_ACT_KIND, b"mirred\0")
        + pack_attr(TCA_ACT_OPTIONS | NLA_F_NESTED, pack_attr(TCA_MIRRED_PARMS, parms))
        + pack_attr(TCA_ACT_COOKIE, cookie)
    )
    options = pack_attr(TCA_BPF_ACT | NLA_F_NESTED, pack_attr(1 | NLA_F_NESTED, mirred)) + _bpf_ops(tuple(program))  # the first (and only) action
    header = TCMSG.pack(0, 0, 0, ifindex, handle, parent or HOOK_PARENT[hook], filter_info(prio))
    return header + pack_attr(TCA_KIND, b"bpf\0") + pack_attr(TCA_OPTIONS | NLA_F_NESTED, options)


def ring_filter_request(ifindex: int, hook: str, prio: int, prog_fd: int, mark: bytes, parent: int | None = None, handle: int = 0) -> bytes:
    """RTM_NEWTFILTER body: a direct-action cls_bpf filter running an eBPF program (a ring writer, which
    returns TC_ACT_UNSPEC: the next filter runs), named by the mark (no action, so no cookie)."""
    options = (
        pack_attr(TCA_BPF_FD, struct.pack("=I", prog_fd))
        + pack_attr(TCA_BPF_NAME, ring_filter_name(mark).encode() + b"\0")
        + pack_attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
    )
    header = TCMSG.pack(0, 0, 0, ifindex, handle, parent or HOOK_PARENT[hook], filter_info(prio))
    return header + pack_attr(TCA_KIND, b"bpf\0") + pack_attr(TCA_OPTIONS | NLA_F_NESTED, options)


def ring_filter_name(mark: bytes) -> str:
    return RING_NAME_PREFIX + mark.hex()


def mark_of_name(name: bytes) -> bytes | None:
    """The mark in a ring filter's TCA_BPF_NAME (bytes as the kernel wrote them, NUL-terminated), or None."""
    text = bytes(name).rstrip(b"\0").decode("ascii", "replace")
    if not text.startswith(RING_NAME_PREFIX):
        return None
    try:
        mark = bytes.fromhex(text[len(RING_NAME_PREFIX):])
    except ValueError:
        return None
    return mark if len(mark) == COOKIE_BYTES else None


def read_ring_filter(data, start: int, end: int) -> tuple[bytes, int] | None:
    """(mark, program id) of a direct-action ring filter reply (vtap's name on it), else None."""
    if not TCMSG.unpack_from(data, start)[4]:
        return None
    found = attributes(data, start + TCMSG.size, end)
    if TCA_KIND not in found or string(data, found[TCA_KIND]) != "bpf" or TCA_OPTIONS not in found:
        return None
    options = attributes(data, *found[TCA_OPTIONS])
    if TCA_BPF_NAME not in options:
        return None
    mark = mark_of_name(data[options[TCA_BPF_NAME][0] : options[TCA_BPF_NAME][1]])
    if mark is None:
        return None
    prog_id = u32(data, options[TCA_BPF_ID]) if TCA_BPF_ID in options else 0
    return mark, prog_id


def without_handle(request: bytes) -> bytes:
    """A mirror_filter_request() with handle 0: the kernel picks one."""
    return request[:8] + b"\0\0\0\0" + request[12:]


def mirred_dump_request() -> bytes:
    """RTM_GETACTION body: a dump of every mirred action (filter-bound ones included), replies filled.

    The kernel walks its action table from the start for every reply of a dump: at
    32 actions a reply (the default) reading 20,000 actions is quadratic, 0.2 s of
    kernel time; with large replies (a few hundred each) it is 0.04 s.
    """
    kind = pack_attr(1 | NLA_F_NESTED, pack_attr(TCA_ACT_KIND, b"mirred\0"))
    flags = pack_attr(TCA_ROOT_FLAGS, struct.pack("=II", TCA_ACT_FLAG_LARGE_DUMP_ON, TCA_ACT_FLAG_LARGE_DUMP_ON))  # nla_bitfield32: value, selector
    return struct.pack("=BBH", 0, 0, 0) + pack_attr(TCA_ROOT_TAB | NLA_F_NESTED, kind) + flags


def qdisc_request(ifindex: int) -> bytes:
    """Body of adding or deleting the clsact qdisc of a device."""
    return TCMSG.pack(0, 0, 0, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0) + pack_attr(TCA_KIND, b"clsact\0")


def qdisc_dump_query() -> bytes:
    """Body of a dump of every qdisc in the namespace."""
    return TCMSG.pack(0, 0, 0, 0, 0, 0, 0)


def qdisc_query(ifindex: int, parent: int) -> bytes:
    """Body of getting one device's qdisc at TC_H_ROOT or TC_H_CLSACT (the kernel answers for that device only)."""
    return TCMSG.pack(0, 0, 0, ifindex, 0, parent, 0)


def filter_query(ifindex: int, hook: str, prio: int = 0, handle: int = 0, parent: int | None = None) -> bytes:
    """Body of a filter dump (prio 0), or of getting or deleting one filter (prio and handle); parent as in mirror_filter_request."""
    parent = parent or HOOK_PARENT[hook]
    if not prio:
        return TCMSG.pack(0, 0, 0, ifindex, 0, parent, 0)
    return TCMSG.pack(0, 0, 0, ifindex, handle, parent, filter_info(prio)) + BPF_KIND


def link_query(name: str | None = None, index: int = 0, kind: str | None = None) -> bytes:
    """Body of a link get (by name or index) or of a dump (optionally of one kind: the kernel filters)."""
    body = IFINFOMSG.pack(0, 0, index, 0, 0)
    if name is not None:
        body += pack_attr(IFLA_IFNAME, name.encode() + b"\0")
    if kind is not None:
        body += pack_attr(IFLA_LINKINFO, pack_attr(IFLA_INFO_KIND, kind.encode() + b"\0"))
    return body


# ---------------------------------------------------------------- reading replies


def read_mirred(data, span):
    """(cookie, target ifindex, packets, bytes, refused) of one action, if it is a mirred with a 16-byte cookie.

    refused: copies the target device did not take (mirred counts a failed
    transmit, e.g. a frame longer than a veth peer's MTU, as an overlimit).
    """
    act = pick(data, *span, ACTION_ATTRIBUTES)
    if TCA_ACT_KIND not in act or TCA_ACT_COOKIE not in act or data[act[TCA_ACT_KIND][0] : act[TCA_ACT_KIND][1]] != b"mirred\0":
        return None
    cookie = bytes(data[act[TCA_ACT_COOKIE][0] : act[TCA_ACT_COOKIE][1]])
    parms = find(data, *act[TCA_ACT_OPTIONS], TCA_MIRRED_PARMS) if TCA_ACT_OPTIONS in act else None
    if len(cookie) != COOKIE_BYTES or parms is None:
        return None
    to_index = MIRRED_PARMS.unpack_from(data, parms[0])[6]
    packets, nbytes, refused = mirred_stats(data, *act[TCA_ACT_STATS]) if TCA_ACT_STATS in act else (0, 0, 0)
    return cookie, to_index, packets, nbytes, refused


def mirred_stats(data, at: int, end: int) -> tuple[int, int, int]:
    """(packets, bytes, refused) of an action's TCA_ACT_STATS attribute, in one loop (20,000 a status)."""
    unpack = ATTR.unpack_from
    packets = nbytes = refused = 0
    while at + 4 <= end:
        size, kind = unpack(data, at)
        if size < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == TCA_STATS_BASIC:
            nbytes, basic_packets = BASIC_STATS.unpack_from(data, at + 4)
            packets = packets or basic_packets  # TCA_STATS_PKT64, when there, holds all 64 bits
        elif kind == TCA_STATS_PKT64:
            packets = U64.unpack_from(data, at + 4)[0]
        elif kind == TCA_STATS_QUEUE:
            refused = QUEUE_STATS.unpack_from(data, at + 4)[4]
        at += (size + 3) & ~3
    return packets, nbytes, refused


def read_filter(data, start: int, end: int):
    """(prio, handle, (cookie, target ifindex, packets, bytes, refused) or None) of a filter reply."""
    _family, _p1, _p2, _index, handle, _parent, info = TCMSG.unpack_from(data, start)
    found = attributes(data, start + TCMSG.size, end)
    if handle and TCA_KIND in found and string(data, found[TCA_KIND]) == "bpf" and TCA_OPTIONS in found:
        options = attributes(data, *found[TCA_OPTIONS])
        for span in attributes(data, *options[TCA_BPF_ACT]).values() if TCA_BPF_ACT in options else ():
            mirred = read_mirred(data, span)
            if mirred is not None:
                return info >> 16, handle, mirred
        mark = mark_of_name(data[options[TCA_BPF_NAME][0] : options[TCA_BPF_NAME][1]]) if TCA_BPF_NAME in options else None
        if mark is not None:  # a direct-action ring filter: no action, no target ifindex, counters in its program
            return info >> 16, handle, (mark, 0, 0, 0, 0)
    return info >> 16, handle, None


def read_filter_mark(data, start: int, end: int) -> bytes | None:
    """The cookie of a bpf filter reply's first action, if it has a 16-byte one (else None).

    observe() gets every vtap filter (20,000 at 10,000 flows): this walks only
    down to the cookie (counters come from the one action dump), in one loop.
    """
    if not TCMSG.unpack_from(data, start)[4]:
        return None  # the per-priority header entry, not a filter
    unpack = ATTR.unpack_from
    # The path to the cookie: TCA_OPTIONS > TCA_BPF_ACT > action 1 > TCA_ACT_COOKIE (TCA_KIND "bpf" first).
    path = (TCA_OPTIONS, TCA_BPF_ACT, 1, TCA_ACT_COOKIE)
    depth, offset, is_bpf = 0, start + TCMSG.size, False
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            return None
        kind &= NLA_TYPE_MASK
        if depth == 0 and kind == TCA_KIND:
            is_bpf = data[offset + 4 : offset + length] == b"bpf\0"
        elif depth == 1 and kind == TCA_BPF_NAME:  # a direct-action ring filter: the mark is its name
            return mark_of_name(data[offset + 4 : offset + length]) if is_bpf else None
        elif kind == path[depth]:
            if depth == 3:
                return bytes(data[offset + 4 : offset + length]) if is_bpf and length - 4 == COOKIE_BYTES else None
            depth, end = depth + 1, offset + length  # into this attribute
            offset += 4
            continue
        offset += (length + 3) & ~3
    return None


BPF_KIND_ATTR = struct.pack("=HH", 8, TCA_KIND) + b"bpf\0"  # the first attribute of a bpf filter reply
COOKIE_ATTR_HEAD = struct.pack("=HH", 4 + COOKIE_BYTES, TCA_ACT_COOKIE)


def filter_has_mark(data, start: int, end: int, mark: bytes) -> bool:
    """read_filter_mark(...) == mark, found faster where it holds (20,000 times a status at 10,000 flows):
    a bpf filter (its kind first, as the kernel writes it) carrying the mark as a whole cookie attribute
    (4 bytes of header, 16 of mark: a digest, found nowhere else in a filter). Anything else is walked."""
    if data.startswith(BPF_KIND_ATTR, start + TCMSG.size) and data.find(COOKIE_ATTR_HEAD + mark, start, end) >= 0 and TCMSG.unpack_from(data, start)[4]:
        return True
    return read_filter_mark(data, start, end) == mark


def read_qdisc_place(data, start: int, end: int) -> dict:
    """{index, handle, parent, kind, blocks: shared block indexes (ingress, egress), 0 = none} of a qdisc reply."""
    index, (handle, parent, kind, blocks) = read_qdisc(data, start, end)
    return {"index": index, "handle": handle, "parent": parent, "kind": kind, "blocks": blocks}


def read_qdisc(data, start: int, end: int) -> tuple[int, tuple]:
    """(ifindex, (handle, parent, kind, blocks)) of a qdisc reply: read_qdisc_place() without the dict,
    for a dump of 20,000 qdiscs (alike ones are one tuple's worth)."""
    _family, _p1, _p2, index, handle, parent, _info = TCMSG.unpack_from(data, start)
    span = find(data, start + TCMSG.size, end, TCA_KIND)  # the first attribute: cheap for every qdisc
    kind = _kind(data, span) if span else None
    blocks = NO_BLOCKS
    if kind in ("clsact", "ingress"):  # only these have blocks (the kernel puts them right after the kind)
        found = pick(data, start + TCMSG.size, end, BLOCK_ATTRIBUTES)
        if found:
            blocks = tuple(u32(data, found[name]) if name in found else 0 for name in (TCA_INGRESS_BLOCK, TCA_EGRESS_BLOCK))
    return index, (handle, parent, kind, blocks)


NO_BLOCKS = (0, 0)
_KINDS: dict = {}  # a qdisc kind's bytes -> its str: a dump of 10,000 devices names a handful of kinds


def _kind(data, span) -> str:
    raw = bytes(data[span[0] : span[1]])
    kind = _KINDS.get(raw)
    if kind is None:
        kind = string(raw, (0, len(raw)))
        if len(_KINDS) < 256:
            _KINDS[raw] = kind
    return kind


def read_qdisc_kind(data, start: int, end: int) -> tuple[int, int, str | None]:
    """(ifindex, parent, kind) of a qdisc reply: read_qdisc_place() without the dict, for a dump of thousands."""
    _family, _p1, _p2, index, _handle, parent, _info = TCMSG.unpack_from(data, start)
    span = find(data, start + TCMSG.size, end, TCA_KIND)
    return index, parent, _kind(data, span) if span else None


def read_action_cookies(data, start: int, end: int) -> list[bytes]:
    """Cookies of the mirred actions in one RTM_GETACTION dump reply."""
    found = attributes(data, start + TCAMSG_SIZE, end)
    if TCA_ROOT_TAB not in found:
        return []
    cookies = []
    for span in attributes(data, *found[TCA_ROOT_TAB]).values():
        # Only the cookie: this dump lists every mirred action in the namespace (thousands).
        act = attributes(data, *span)
        if TCA_ACT_COOKIE in act and TCA_ACT_KIND in act and string(data, act[TCA_ACT_KIND]) == "mirred":
            start, end = act[TCA_ACT_COOKIE]
            if end - start == COOKIE_BYTES:
                cookies.append(bytes(data[start:end]))
    return cookies


def read_mirred_actions(data, start: int, end: int) -> list[tuple]:
    """read_mirred() of each action in one RTM_GETACTION dump reply: (cookie, target ifindex, packets, bytes, refused).

    The same reading as read_mirred, written out in one loop: an action dump at
    10,000 flows holds 20,000 actions.
    """
    tab = find(data, start + TCAMSG_SIZE, end, TCA_ROOT_TAB)
    if tab is None:
        return []
    unpack, out = ATTR.unpack_from, []
    offset, tab_end = tab
    while offset + 4 <= tab_end:
        length, _index = unpack(data, offset)
        if length < 4:
            break
        at, action_end = offset + 4, offset + length
        offset += (length + 3) & ~3
        is_mirred, cookie, to_index, stats = False, None, None, None
        while at + 4 <= action_end:
            size, kind = unpack(data, at)
            if size < 4:
                break
            kind &= NLA_TYPE_MASK
            if kind == TCA_ACT_KIND:
                is_mirred = data[at + 4 : at + size] == b"mirred\0"
            elif kind == TCA_ACT_COOKIE:
                cookie = bytes(data[at + 4 : at + size])
            elif kind == TCA_ACT_OPTIONS:
                parms = find(data, at + 4, at + size, TCA_MIRRED_PARMS)
                to_index = MIRRED_PARMS.unpack_from(data, parms[0])[6] if parms else None
            elif kind == TCA_ACT_STATS:
                stats = (at + 4, at + size)
            at += (size + 3) & ~3
        if not is_mirred or cookie is None or len(cookie) != COOKIE_BYTES or to_index is None:
            continue
        packets, nbytes, refused = mirred_stats(data, *stats) if stats is not None else (0, 0, 0)
        out.append((cookie, to_index, packets, nbytes, refused))
    return out


def read_link(data, start: int, end: int) -> dict:
    """{index, flags, name, alias, kind, vxlan: {vni, remote, port} or None, mtu, tx_errors, tx_dropped} of a link reply."""
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, start)
    found = pick(data, start + IFINFOMSG.size, end, LINK_ATTRIBUTES)
    link = {"index": index, "flags": flags, "name": None, "alias": None, "kind": None, "vxlan": None, "mtu": None, "tx_errors": 0, "tx_dropped": 0}
    if IFLA_MTU in found:
        link["mtu"] = u32(data, found[IFLA_MTU])
    if IFLA_STATS64 in found:
        stats = LINK_STATS64.unpack_from(data, found[IFLA_STATS64][0])
        link["tx_errors"], link["tx_dropped"] = stats[5], stats[7]
    if IFLA_IFNAME in found:
        link["name"] = string(data, found[IFLA_IFNAME])
    if IFLA_IFALIAS in found:
        link["alias"] = string(data, found[IFLA_IFALIAS])
    info = attributes(data, *found[IFLA_LINKINFO]) if IFLA_LINKINFO in found else {}
    if IFLA_INFO_KIND in info:
        link["kind"] = sys.intern(string(data, info[IFLA_INFO_KIND]))  # one "veth" for thousands of links
    if link["kind"] == "vxlan" and IFLA_INFO_DATA in info:
        vx = attributes(data, *info[IFLA_INFO_DATA])
        remote = None
        for kind, family in ((IFLA_VXLAN_GROUP, socket.AF_INET), (IFLA_VXLAN_GROUP6, socket.AF_INET6)):
            if kind in vx:
                remote = socket.inet_ntop(family, bytes(data[vx[kind][0] : vx[kind][1]]))
        port = struct.unpack_from("!H", data, vx[IFLA_VXLAN_PORT][0])[0] if IFLA_VXLAN_PORT in vx else None
        link["vxlan"] = {"vni": u32(data, vx[IFLA_VXLAN_ID]) if IFLA_VXLAN_ID in vx else None, "remote": remote, "port": port}
        for kind, family in ((IFLA_VXLAN_LOCAL, socket.AF_INET), (IFLA_VXLAN_LOCAL6, socket.AF_INET6)):
            if kind in vx and any(data[vx[kind][0] : vx[kind][1]]):
                link["vxlan"]["local"] = socket.inet_ntop(family, bytes(data[vx[kind][0] : vx[kind][1]]))
    if link["kind"] in ("gretap", "ip6gretap", "erspan", "ip6erspan") and IFLA_INFO_DATA in info:
        from vtap_drivers.linux.grenl import read_tunnel

        link["tunnel"] = read_tunnel(data, info[IFLA_INFO_DATA], link["kind"])
    return link


def read_link_brief(data, start: int, end: int) -> dict:
    """read_link(), down to what plan and observe read of every device: {index, flags, name, mtu,
    brief: True} (kind and alias None: not read; a target's link is read whole, with its counters).

    A link reply holds some forty attributes; name and MTU come first. A reply that
    carries "vtap:" (the alias of one of vtap's own devices) is read whole: observe
    looks at those by kind and alias.
    """
    if data.find(MARK_ALIAS, start, end) >= 0:
        return read_link(data, start, end)
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, start)
    unpack = ATTR.unpack_from
    name = mtu = None
    offset = start + IFINFOMSG.size
    while offset + 4 <= end and (name is None or mtu is None):
        length, kind = unpack(data, offset)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == IFLA_IFNAME:
            name = string(data, (offset + 4, offset + length))
        elif kind == IFLA_MTU:
            mtu = u32(data, (offset + 4, offset + length))
        offset += (length + 3) & ~3
    return {"index": index, "flags": flags, "name": name, "mtu": mtu, "kind": None, "alias": None, "brief": True}


def link_names_query() -> bytes:
    """Body of a link dump for names and indexes only: the kernel leaves the statistics out."""
    return IFINFOMSG.pack(0, 0, 0, 0, 0) + pack_attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))


def read_link_name(data, start: int, end: int) -> tuple[str | None, int]:
    """(name, index) of a link reply, walking its attributes only up to the name (the kernel puts it first)."""
    index = IFINFOMSG.unpack_from(data, start)[2]
    offset = start + IFINFOMSG.size
    while offset + ATTR.size <= end:
        length, kind = ATTR.unpack_from(data, offset)
        if length < ATTR.size:
            break
        if kind & NLA_TYPE_MASK == IFLA_IFNAME:
            return string(data, (offset + ATTR.size, offset + length)), index
        offset += (length + 3) & ~3
    return None, index
