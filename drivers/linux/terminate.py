"""Tunnel termination: `vtap capture --listen gre://ADDR | erspan://ADDR[?id=N] | vxlan://ADDR[:PORT][?vni=N]`.

The end of a mirror path: packets of a GRE, ERSPAN (type I/II/III) or VXLAN
stream arriving at ADDR are read in userspace (a raw IP socket for protocol 47,
a UDP socket for VXLAN), decapsulated by decap.py, and their inner frames,
unchanged, are
  - written to pcapng (-w FILE), each with a packet comment saying what the
    tunnel said (ERSPAN session id, type, direction, hardware id, timestamp;
    GRE key; VNI) and, for ERSPAN type III, the direction in epb_flags; and/or
  - re-emitted on a local device (--to port:IFNAME), so an IDS that reads an
    interface (Suricata, Zeek, Snort) can sit behind any tunnel.

A raw socket gets a copy of every GRE packet for its address whether or not
the kernel has GRE tunnels of its own, and its presence keeps the kernel from
answering with ICMP "protocol unreachable".
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from vtap_core.errors import NotFound, OperationFailed, ValidationError
from vtap_core.model import ERSPAN_ID_MAX, GRE_KEY_MAX, VNI_MAX, VXLAN_DEFAULT_PORT, check_int
from vtap_drivers.linux import capture
from vtap_drivers.linux.decap import decap_gre, decap_vxlan
from vtap_drivers.linux.pcapng import PcapngWriter

IPPROTO_GRE = 47
LISTEN_RULE = "write gre://ADDR[?key=N], erspan://ADDR[?id=N] or vxlan://ADDR[:PORT][?vni=N], ADDR a local IP address (0.0.0.0 or [::] for all)"
SELECTORS = {"gre": ("key", GRE_KEY_MAX), "erspan": ("id", ERSPAN_ID_MAX), "vxlan": ("vni", VNI_MAX)}


@dataclass(frozen=True)
class Listen:
    scheme: str  # gre | erspan | vxlan
    address: str
    port: int | None  # vxlan only
    only: int | None  # the key, session id or VNI to keep (None: all)


def parse_listen(text: str) -> Listen:
    scheme = text.partition("://")[0] if isinstance(text, str) else ""
    if scheme not in SELECTORS:
        raise ValidationError("listen", f"{text!r}: {LISTEN_RULE}")
    try:
        url = urlsplit(text)
        host, port = url.hostname, url.port
        query = parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
        ipaddress.ip_address(host or "")
    except ValueError:
        raise ValidationError("listen", f"{text!r}: {LISTEN_RULE}") from None
    name, highest = SELECTORS[scheme]
    if url.path not in ("", "/") or url.fragment or url.username or any(k != name for k, _ in query) or len(query) > 1:
        raise ValidationError("listen", f"{text!r}: {LISTEN_RULE}")
    if port is not None and scheme != "vxlan":
        raise ValidationError("listen", f"{text!r}: {scheme} has no port; {LISTEN_RULE}")
    if scheme == "vxlan":
        port = VXLAN_DEFAULT_PORT if port is None else check_int("listen port", port, 1, 65535)
    only = check_int(f"listen {name}", query[0][1], 0, highest) if query else None
    return Listen(scheme, host, port, only)


def open_gre_socket(address: str, netns: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = capture._socket_in(netns, family, socket.SOCK_RAW, IPPROTO_GRE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, capture.SO_TIMESTAMPNS, 1)
        capture._enlarge_receive_buffer(sock)
        sock.bind((address, 0))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ValidationError("listen", f"{address} is not an address of this host") from None
        raise
    return sock


def open_output_port(target: str, netns: str | None = None) -> socket.socket:
    """An AF_PACKET socket that transmits on the device of a port:IFNAME."""
    if not isinstance(target, str) or not target.startswith("port:") or not target[5:]:
        raise ValidationError("--to", f"{target!r}: write port:IFNAME (a local device the inner frames are sent on)")
    device = target[5:]
    sock = capture._socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((device, 0))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENODEV:
            raise NotFound(f"--to: device {device} does not exist") from None
        raise
    return sock


def _payload(listen: Listen, sock_family: int, view, nbytes: int):
    """The tunnel payload of one received datagram (an IPv4 raw socket also hands over the IP header).

    A view into the receive buffer, not a copy: use it before the next datagram.
    """
    if listen.scheme != "vxlan" and sock_family == socket.AF_INET:
        return view[(view[0] & 0x0F) * 4 : nbytes]
    return view[:nbytes]


def _selected(listen: Listen, meta) -> bool:
    if listen.only is None:
        return True
    if listen.scheme == "gre":
        return meta.tunnel == "gre" and meta.key == listen.only
    if listen.scheme == "erspan":
        return meta.tunnel == "erspan" and meta.session_id == listen.only
    return meta.vni == listen.only


def _flags(meta) -> int | None:
    """pcapng epb_flags: bits 0-1 direction, 01 inbound, 10 outbound (only ERSPAN type III says: ingress, egress)."""
    return {"ingress": 1, "egress": 2}.get(meta.direction)


def terminate(listen_text: str, path: str | None = None, to: str | None = None, count: int | None = None, duration: float | None = None, stop: threading.Event | None = None, netns: str | None = None) -> int:
    """Terminate a tunnel until count, duration, stop or Ctrl-C; returns the number of inner frames kept."""
    listen = parse_listen(listen_text)
    if path is None and to is None:
        raise ValidationError("capture", "give -w FILE.pcapng, --to port:IFNAME, or both")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValidationError("count", f"{count!r} is not a number of frames (1 or more)")
    if duration is not None and not (isinstance(duration, (int, float)) and duration > 0):
        raise ValidationError("duration", f"{duration!r} is not a positive number of seconds")
    if path is not None:
        capture.check_capture_path(path, field="-w")
    stop = stop or threading.Event()
    deadline = None if duration is None else time.monotonic() + duration
    out = open_output_port(to, netns) if to is not None else None
    sock = None
    writer = None
    kept = 0
    try:
        if listen.scheme == "vxlan":
            sock = capture.open_vxlan_socket(listen.address, listen.port, netns)
        else:
            sock = open_gre_socket(listen.address, netns)
        writer = PcapngWriter.create(path, if_name=listen_text) if path is not None else None
        decap = decap_vxlan if listen.scheme == "vxlan" else decap_gre

        def should_stop():
            return stop.is_set() or (count is not None and kept >= count) or (deadline is not None and time.monotonic() >= deadline)

        def on_idle():
            if writer is not None:
                writer.flush()

        for view, nbytes, ancdata, _sender in capture._datagrams(sock, should_stop, on_idle):
            if nbytes > len(view):
                continue  # truncated: not a frame we can pass on unchanged
            found = decap(_payload(listen, sock.family, view, nbytes))
            if found is None or len(found[0]) < capture.ETHERNET_HEADER or not _selected(listen, found[1]):
                continue
            frame, meta = found
            if writer is not None:
                writer.write(frame, capture._timestamp_ns(ancdata), comment=meta.comment(), flags=_flags(meta))
            if out is not None:
                try:
                    out.send(frame)
                except OSError as exc:
                    if exc.errno not in (errno.ENOBUFS, errno.ENETDOWN, errno.EMSGSIZE):
                        raise OperationFailed(f"--to {to}: {exc.strerror}") from None
            kept += 1
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user ends an open-ended capture
    finally:
        if writer is not None:
            writer.close()
        for s in (sock, out):
            if s is not None:
                s.close()
    return kept
