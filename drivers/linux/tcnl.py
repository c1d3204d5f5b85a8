"""Netlink messages for the one tc shape vtap uses: cls_bpf (classic ops) + mirred, with a cookie.

pyroute2's own tcmsg plugin declares TCA_BPF_OPS as a uint32, but classic ops
are an array of struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} with their
count in TCA_BPF_OPS_LEN (u16); and its action parser stops before
TCA_ACT_COOKIE, which is where vtap keeps its mark. So these classes encode
and decode exactly that shape and nothing more; everything else on the socket
stays pyroute2's.
"""

from __future__ import annotations

import socket
import struct

from pyroute2.netlink import nla, nlmsg
from pyroute2.netlink.rtnl.ifinfmsg.plugins.vxlan import vxlan
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from vtap_drivers.linux.nlsock import attributes, string, u32, u64

# linux/pkt_sched.h, linux/pkt_cls.h, linux/tc_act/tc_mirred.h
TC_H_CLSACT = 0xFFFFFFF1
HOOK_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
PARENT_HOOK = {parent: hook for hook, parent in HOOK_PARENT.items()}
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
TC_ACT_UNSPEC = -1  # "continue": later filters on the hook still see the packet
TCA_EGRESS_MIRROR = 2
COOKIE_BYTES = 16  # TC_COOKIE_MAX_SIZE


def filter_info(prio: int) -> int:
    """tcm_info of a filter: priority in the high half, protocol (network order) in the low."""
    return (prio << 16) | socket.htons(ETH_P_ALL)


def pack_ops(program) -> bytes:
    return b"".join(struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in program)


class stats(nla):
    nla_map = (
        ("TCA_STATS_UNSPEC", "none"),
        ("TCA_STATS_BASIC", "basic"),
        ("TCA_STATS_RATE_EST", "hex"),
        ("TCA_STATS_QUEUE", "hex"),
        ("TCA_STATS_APP", "hex"),
        ("TCA_STATS_RATE_EST64", "hex"),
        ("TCA_STATS_PAD", "hex"),
        ("TCA_STATS_BASIC_HW", "hex"),
        ("TCA_STATS_PKT64", "uint64"),
    )

    class basic(nla):
        fields = (("bytes", "Q"), ("packets", "I"))


class mirred_options(nla):
    nla_map = (
        ("TCA_MIRRED_UNSPEC", "none"),
        ("TCA_MIRRED_TM", "hex"),
        ("TCA_MIRRED_PARMS", "parms"),
        ("TCA_MIRRED_PAD", "hex"),
        ("TCA_MIRRED_BLOCKID", "hex"),
    )

    class parms(nla):
        fields = (
            ("index", "I"),
            ("capab", "I"),
            ("action", "i"),
            ("refcnt", "i"),
            ("bindcnt", "i"),
            ("eaction", "i"),
            ("ifindex", "I"),
        )


class action(nla):
    nla_map = (
        ("TCA_ACT_UNSPEC", "none"),
        ("TCA_ACT_KIND", "asciiz"),
        ("TCA_ACT_OPTIONS", "get_options"),
        ("TCA_ACT_INDEX", "uint32"),
        ("TCA_ACT_STATS", "stats"),
        ("TCA_ACT_PAD", "hex"),
        ("TCA_ACT_COOKIE", "cdata"),
    )
    stats = stats

    @staticmethod
    def get_options(self, *argv, **kwarg):
        return mirred_options if self.get_attr("TCA_ACT_KIND") == "mirred" else self.hex


class actions(nla):
    nla_map = tuple((f"TCA_ACT_PRIO_{i}", "action") for i in range(33))
    action = action


class bpf_options(nla):
    nla_map = (
        ("TCA_BPF_UNSPEC", "none"),
        ("TCA_BPF_ACT", "actions"),
        ("TCA_BPF_POLICE", "hex"),
        ("TCA_BPF_CLASSID", "uint32"),
        ("TCA_BPF_OPS_LEN", "uint16"),
        ("TCA_BPF_OPS", "cdata"),
        ("TCA_BPF_FD", "uint32"),
        ("TCA_BPF_NAME", "asciiz"),
        ("TCA_BPF_FLAGS", "uint32"),
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )
    actions = actions


class filtermsg(nlmsg):
    """A tc filter message whose bpf options are decoded the vtap way."""

    prefix = "TCA_"
    fields = (
        ("family", "B"),
        ("pad1", "B"),
        ("pad2", "H"),
        ("index", "i"),
        ("handle", "I"),
        ("parent", "I"),
        ("info", "I"),
    )
    nla_map = (
        ("TCA_UNSPEC", "none"),
        ("TCA_KIND", "asciiz"),
        ("TCA_OPTIONS", "get_options"),
        ("TCA_STATS", "hex"),
        ("TCA_XSTATS", "hex"),
        ("TCA_RATE", "hex"),
        ("TCA_FCNT", "hex"),
        ("TCA_STATS2", "hex"),
        ("TCA_STAB", "hex"),
        ("TCA_PAD", "hex"),
        ("TCA_DUMP_INVISIBLE", "hex"),
        ("TCA_CHAIN", "uint32"),
    )

    @staticmethod
    def get_options(self, *argv, **kwarg):
        return bpf_options if self.get_attr("TCA_KIND") == "bpf" else self.hex


def mirror_filter_request(ifindex: int, hook: str, prio: int, program, to_ifindex: int, cookie: bytes) -> filtermsg:
    """RTM_NEWTFILTER body: bpf(program) -> mirred egress mirror to_ifindex, cookie, continue."""
    msg = filtermsg()
    msg["index"] = ifindex
    msg["parent"] = HOOK_PARENT[hook]
    msg["info"] = filter_info(prio)
    mirred = {
        "attrs": [
            ["TCA_ACT_KIND", "mirred"],
            [
                "TCA_ACT_OPTIONS",
                {"attrs": [["TCA_MIRRED_PARMS", {"eaction": TCA_EGRESS_MIRROR, "ifindex": to_ifindex, "action": TC_ACT_UNSPEC}]]},
            ],
            ["TCA_ACT_COOKIE", cookie],
        ]
    }
    msg["attrs"] = [
        ["TCA_KIND", "bpf"],
        [
            "TCA_OPTIONS",
            {
                "attrs": [
                    ["TCA_BPF_ACT", {"attrs": [["TCA_ACT_PRIO_1", mirred]]}],
                    ["TCA_BPF_OPS_LEN", len(program)],
                    ["TCA_BPF_OPS", pack_ops(program)],
                ]
            },
        ],
    ]
    return msg


def qdisc_request(ifindex: int) -> tcmsg:
    """Body of adding or deleting the clsact qdisc of a device."""
    msg = tcmsg()
    msg["index"] = ifindex
    msg["handle"] = CLSACT_HANDLE
    msg["parent"] = TC_H_CLSACT
    msg["attrs"] = [["TCA_KIND", "clsact"]]
    return msg


def filter_query(ifindex: int, hook: str, prio: int = 0, handle: int = 0) -> filtermsg:
    """Body of a filter dump (prio 0) or of a delete (prio and handle)."""
    msg = filtermsg()
    msg["index"] = ifindex
    msg["parent"] = HOOK_PARENT[hook]
    msg["handle"] = handle
    msg["info"] = filter_info(prio) if prio else 0
    if prio:
        msg["attrs"] = [["TCA_KIND", "bpf"]]
    return msg


def mirror_of(msg):
    """(cookie, target ifindex, packets, bytes) of a cls_bpf filter's mirred action, else None."""
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    options = msg.get_attr("TCA_OPTIONS")
    acts = options.get_attr("TCA_BPF_ACT") if options is not None and hasattr(options, "get_attr") else None
    if acts is None:
        return None
    for _, act in acts["attrs"]:
        state = mirred_state(act)
        if state is not None:
            return state
    return None


def mirred_state(act):
    """(cookie, target ifindex, packets, bytes) of a mirred action with a 16-byte cookie, else None."""
    if act.get_attr("TCA_ACT_KIND") != "mirred":
        return None
    cookie = act.get_attr("TCA_ACT_COOKIE")
    if not cookie or len(cookie) != COOKIE_BYTES:
        return None
    parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
    packets = bytes_ = 0
    counters = act.get_attr("TCA_ACT_STATS")
    if counters is not None:
        basic = counters.get_attr("TCA_STATS_BASIC")
        if basic is not None:
            packets, bytes_ = basic["packets"], basic["bytes"]
        packets = counters.get_attr("TCA_STATS_PKT64") or packets
    return bytes(cookie), parms["ifindex"], packets, bytes_


class tab(nla):
    nla_map = tuple((f"TCA_ACT_PRIO_{i}", "action") for i in range(33))
    action = action


class actionmsg(nlmsg):
    """struct tcamsg: a dump of one action kind (all mirred actions of the namespace)."""

    prefix = "TCA_"
    fields = (("family", "B"), ("pad1", "B"), ("pad2", "H"))
    nla_map = (
        ("TCA_ROOT_UNSPEC", "none"),
        ("TCA_ROOT_TAB", "tab"),
        ("TCA_ROOT_FLAGS", "flags"),
        ("TCA_ROOT_COUNT", "uint32"),
        ("TCA_ROOT_TIME_DELTA", "uint32"),
    )
    tab = tab

    class flags(nla):
        fields = (("value", "I"), ("selector", "I"))


def mirred_dump_request() -> actionmsg:
    """RTM_GETACTION dump of every mirred action (32 per message; filter-bound ones included)."""
    msg = actionmsg()
    msg["attrs"] = [["TCA_ROOT_TAB", {"attrs": [["TCA_ACT_PRIO_1", {"attrs": [["TCA_ACT_KIND", "mirred"]]}]]}]]
    return msg


class linkmsg(nlmsg):
    """struct ifinfomsg with only what vtap reads: name, alias, kind (and vxlan data)."""

    prefix = "IFLA_"
    fields = (("family", "B"), ("__align", "x"), ("ifi_type", "H"), ("index", "i"), ("flags", "I"), ("change", "I"))
    nla_map = (
        (3, "IFLA_IFNAME", "asciiz"),
        (18, "IFLA_LINKINFO", "linkinfo"),
        (20, "IFLA_IFALIAS", "asciiz"),
    )

    class linkinfo(nla):
        nla_map = ((1, "IFLA_INFO_KIND", "asciiz"), (2, "IFLA_INFO_DATA", "get_data"))

        @staticmethod
        def get_data(self, *argv, **kwarg):
            return vxlan if self.get_attr("IFLA_INFO_KIND") == "vxlan" else self.hex

    def kind(self):
        info = self.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info is not None else None

    def vxlan_data(self):
        info = self.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_DATA") if info is not None else None


def link_query(name: str | None = None, index: int = 0, kind: str | None = None) -> linkmsg:
    """Body of a get (by name or index) or of a dump filtered by kind."""
    msg = linkmsg()
    msg["index"] = index
    msg["attrs"] = []
    if name is not None:
        msg["attrs"].append(["IFLA_IFNAME", name])
    if kind is not None:
        msg["attrs"].append(["IFLA_LINKINFO", {"attrs": [["IFLA_INFO_KIND", kind]]}])
    return msg


# ---------------------------------------------------------------- reading replies (nlsock's walker)
# Attribute numbers from linux/rtnetlink.h, pkt_cls.h, tc_act/tc_mirred.h, gen_stats.h, if_link.h.
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_ACT = 1
TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_ACT_STATS, TCA_ACT_COOKIE = 1, 2, 4, 6
TCA_MIRRED_PARMS = 2
TCA_STATS_BASIC, TCA_STATS_PKT64 = 1, 8
TCA_ROOT_TAB = 1
TCMSG = struct.Struct("=BBHiIII")  # family, pad, pad, ifindex, handle, parent, info
TCAMSG_SIZE = 4
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFLA_IFNAME, IFLA_LINKINFO, IFLA_IFALIAS = 3, 18, 20
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_GROUP, IFLA_VXLAN_PORT, IFLA_VXLAN_GROUP6 = 1, 2, 15, 16


def read_mirred(data, span):
    """(cookie, target ifindex, packets, bytes) of one action's attributes, if it is a cookied mirred."""
    act = attributes(data, *span)
    if TCA_ACT_KIND not in act or string(data, act[TCA_ACT_KIND]) != "mirred" or TCA_ACT_COOKIE not in act:
        return None
    cookie = bytes(data[act[TCA_ACT_COOKIE][0] : act[TCA_ACT_COOKIE][1]])
    if len(cookie) != COOKIE_BYTES or TCA_ACT_OPTIONS not in act:
        return None
    options = attributes(data, *act[TCA_ACT_OPTIONS])
    if TCA_MIRRED_PARMS not in options:
        return None
    to_index = struct.unpack_from("=7I", data, options[TCA_MIRRED_PARMS][0])[6]
    packets = nbytes = 0
    if TCA_ACT_STATS in act:
        stats = attributes(data, *act[TCA_ACT_STATS])
        if TCA_STATS_BASIC in stats:
            nbytes, packets = struct.unpack_from("=QI", data, stats[TCA_STATS_BASIC][0])
        if TCA_STATS_PKT64 in stats:
            packets = u64(data, stats[TCA_STATS_PKT64])
    return cookie, to_index, packets, nbytes


def read_filter(data, start: int, end: int):
    """(prio, handle, (cookie, target ifindex, packets, bytes) or None) of a filter reply."""
    _family, _p1, _p2, _index, handle, _parent, info = TCMSG.unpack_from(data, start)
    found = attributes(data, start + TCMSG.size, end)
    mirred = None
    if handle and TCA_KIND in found and string(data, found[TCA_KIND]) == "bpf" and TCA_OPTIONS in found:
        options = attributes(data, *found[TCA_OPTIONS])
        if TCA_BPF_ACT in options:
            for span in attributes(data, *options[TCA_BPF_ACT]).values():
                mirred = read_mirred(data, span)
                if mirred is not None:
                    break
    return info >> 16, handle, mirred


def read_action_cookies(data, start: int, end: int) -> list[bytes]:
    """Cookies of the mirred actions in one RTM_GETACTION dump reply."""
    found = attributes(data, start + TCAMSG_SIZE, end)
    if TCA_ROOT_TAB not in found:
        return []
    out = []
    for span in attributes(data, *found[TCA_ROOT_TAB]).values():
        mirred = read_mirred(data, span)
        if mirred is not None:
            out.append(mirred[0])
    return out


def read_link(data, start: int, end: int) -> dict:
    """{index, flags, name, alias, kind, vxlan: {id, remote, port} or None} of a link reply."""
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, start)
    found = attributes(data, start + IFINFOMSG.size, end)
    link = {"index": index, "flags": flags, "name": None, "alias": None, "kind": None, "vxlan": None}
    if IFLA_IFNAME in found:
        link["name"] = string(data, found[IFLA_IFNAME])
    if IFLA_IFALIAS in found:
        link["alias"] = string(data, found[IFLA_IFALIAS])
    if IFLA_LINKINFO in found:
        info = attributes(data, *found[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            link["kind"] = string(data, info[IFLA_INFO_KIND])
        if link["kind"] == "vxlan" and IFLA_INFO_DATA in info:
            vx = attributes(data, *info[IFLA_INFO_DATA])
            remote = None
            if IFLA_VXLAN_GROUP in vx:
                remote = socket.inet_ntop(socket.AF_INET, bytes(data[vx[IFLA_VXLAN_GROUP][0] : vx[IFLA_VXLAN_GROUP][1]]))
            elif IFLA_VXLAN_GROUP6 in vx:
                remote = socket.inet_ntop(socket.AF_INET6, bytes(data[vx[IFLA_VXLAN_GROUP6][0] : vx[IFLA_VXLAN_GROUP6][1]]))
            port = struct.unpack_from("!H", data, vx[IFLA_VXLAN_PORT][0])[0] if IFLA_VXLAN_PORT in vx else None
            link["vxlan"] = {"vni": u32(data, vx[IFLA_VXLAN_ID]) if IFLA_VXLAN_ID in vx else None, "remote": remote, "port": port}
    return link
