"""Netlink bodies for vtap's GRE and ERSPAN target devices (gretap, ip6gretap, erspan, ip6erspan).

pyroute2 0.9 knows gretap's attributes but not ERSPAN's (IFLA_GRE_ERSPAN_*,
linux/if_tunnel.h), so these link requests are packed here, as tcnl.py packs tc.

ERSPAN in the kernel (net/ipv4/ip_gre.c): the GRE key carries the 10-bit
session id and the flags must be exactly key + sequence; erspan_ver 1 is
type II (with a 20-bit index), erspan_ver 2 is type III (direction and
hardware id bits, fixed per device).
"""

from __future__ import annotations

import ipaddress
import os
import platform
import socket
import struct

from vtap_drivers.linux.nlsock import attributes, u32
from vtap_drivers.linux.tcnl import IFINFOMSG, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO, NLA_F_NESTED, pack_attr

# linux/if_tunnel.h: one enum for gre and ip6gre alike
IFLA_GRE_IFLAGS, IFLA_GRE_OFLAGS, IFLA_GRE_IKEY, IFLA_GRE_OKEY = 2, 3, 4, 5
IFLA_GRE_LOCAL, IFLA_GRE_REMOTE, IFLA_GRE_PMTUDISC, IFLA_GRE_FLAGS = 6, 7, 10, 13
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1  # linux/ip6_tunnel.h
IFLA_GRE_ERSPAN_INDEX, IFLA_GRE_ERSPAN_VER, IFLA_GRE_ERSPAN_DIR = 21, 22, 23
ERSPAN_DIRS = ("ingress", "egress")  # the D bit of a type III header: 0, 1
GRE_KEY, GRE_SEQ = 0x2000, 0x1000  # network order on the wire (__be16 in the kernel)

KINDS = {("gre", 4): "gretap", ("gre", 6): "ip6gretap", ("erspan", 4): "erspan", ("erspan", 6): "ip6erspan"}
MODULES = {"gretap": "ip_gre", "erspan": "ip_gre", "ip6gretap": "ip6_gre", "ip6erspan": "ip6_gre"}


def kind_for(scheme: str, remote: str) -> str:
    return KINDS[scheme, ipaddress.ip_address(remote).version]


def kernel_has(kind: str) -> bool:
    """Whether the running kernel can make this device type, without making one.

    True when its module is loaded, built in, or installed for this release
    (the kernel then loads it on the first request for the type).
    """
    module = MODULES[kind]
    if os.path.isdir(f"/sys/module/{module}"):
        return True
    release = platform.release()
    for listing in ("modules.builtin", "modules.dep"):
        try:
            with open(f"/lib/modules/{release}/{listing}") as lines:
                if any(os.path.basename(line.split(":", 1)[0]).split(".ko")[0] == module for line in lines):
                    return True
        except OSError:
            continue
    return False


def new_link_request(name: str, kind: str, remote: str, local: str | None, key: int | None, erspan_version: int | None = None, direction: str | None = None) -> bytes:
    """RTM_NEWLINK body for a tunnel device; ERSPAN: key = session id, erspan_version 2 (type II) or 3 (type III),
    direction "ingress"|"egress" (type III: the device sets that D bit on every copy)."""
    family = socket.AF_INET6 if kind.startswith("ip6") else socket.AF_INET
    data = pack_attr(IFLA_GRE_REMOTE, socket.inet_pton(family, remote))
    if local:
        data += pack_attr(IFLA_GRE_LOCAL, socket.inet_pton(family, local))
    flags = 0
    if key is not None:
        flags |= GRE_KEY
        # The kernel allows one device per (remote, local, input key): type III's egress twin of a
        # session differs in its input key only (it never receives; copies carry the output key).
        ikey = key ^ 0x200 if direction == "egress" else key
        data += pack_attr(IFLA_GRE_IKEY, struct.pack("!I", ikey)) + pack_attr(IFLA_GRE_OKEY, struct.pack("!I", key))
    if erspan_version is not None:
        flags |= GRE_SEQ
        data += pack_attr(IFLA_GRE_ERSPAN_VER, struct.pack("=B", erspan_version - 1))
        if erspan_version == 2:
            data += pack_attr(IFLA_GRE_ERSPAN_INDEX, struct.pack("=I", 0))
        if erspan_version == 3 and direction is not None:
            data += pack_attr(IFLA_GRE_ERSPAN_DIR, struct.pack("=B", ERSPAN_DIRS.index(direction)))
    if flags:
        data += pack_attr(IFLA_GRE_IFLAGS, struct.pack("!H", flags)) + pack_attr(IFLA_GRE_OFLAGS, struct.pack("!H", flags))
    if family == socket.AF_INET6:
        # No encapsulation-limit destination option: collectors expect GRE right after the IPv6 header.
        data += pack_attr(IFLA_GRE_FLAGS, struct.pack("=I", IP6_TNL_F_IGN_ENCAP_LIMIT))
    if family == socket.AF_INET:
        # No DF on the outer header: a full-size copy plus the tunnel's overhead is fragmented, not dropped.
        data += pack_attr(IFLA_GRE_PMTUDISC, b"\0")
    info = pack_attr(IFLA_INFO_KIND, kind.encode() + b"\0") + pack_attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
    return IFINFOMSG.pack(0, 0, 0, 0, 0) + pack_attr(IFLA_IFNAME, name.encode() + b"\0") + pack_attr(IFLA_LINKINFO | NLA_F_NESTED, info)


def read_tunnel(data, span, kind: str) -> dict:
    """{remote, local, key} of a gretap/erspan device's IFLA_INFO_DATA (key: the ERSPAN session id too)."""
    found = attributes(data, *span)
    family = socket.AF_INET6 if kind.startswith("ip6") else socket.AF_INET

    def address(attr):
        if attr not in found:
            return None
        text = socket.inet_ntop(family, bytes(data[found[attr][0] : found[attr][1]]))
        return None if ipaddress.ip_address(text).is_unspecified else text

    key = None
    if IFLA_GRE_OKEY in found and IFLA_GRE_OFLAGS in found and struct.unpack_from("!H", data, found[IFLA_GRE_OFLAGS][0])[0] & GRE_KEY:
        key = socket.ntohl(u32(data, found[IFLA_GRE_OKEY]))
    version = data[found[IFLA_GRE_ERSPAN_VER][0]] + 1 if IFLA_GRE_ERSPAN_VER in found else None
    direction = ERSPAN_DIRS[data[found[IFLA_GRE_ERSPAN_DIR][0]] & 1] if version == 3 and IFLA_GRE_ERSPAN_DIR in found else None
    return {"remote": address(IFLA_GRE_REMOTE), "local": address(IFLA_GRE_LOCAL), "key": key, "version": version, "direction": direction}
