"""Tunnel termination: `vtap capture --listen gre://ADDR | erspan://ADDR[?id=N] | vxlan://ADDR[:PORT][?vni=N]`.

The end of a mirror path: packets of a GRE, ERSPAN (type I/II/III) or VXLAN
stream arriving at ADDR are read in userspace (below), decapsulated by decap.py,
and their inner frames, unchanged, are
  - written to pcapng (-w FILE), with what the tunnel said: one interface
    per stream, whose description names it (ERSPAN type and session id, type
    III hardware id; GRE key; VNI), and per frame the type III direction in
    epb_flags, the GRE sequence number in epb_packetid and the type III
    timestamp in a packet comment (tunnelblock.py); and/or
  - re-emitted on a local device (--to port:IFNAME), so an IDS that reads an
    interface (Suricata, Zeek, Snort) can sit behind any tunnel.

How packets are read: a memory-mapped TPACKET_V3 ring (ring.py) on a packet
socket for IPv4 (or IPv6) packets of every device, at the point where the IP
stack receives them, with a classic BPF program that keeps only the tunnel's
packets for ADDR (IP protocol 47, or UDP to PORT; not what the host sends,
not frames for other hosts' MACs). IPv4 fragments, and IPv6 ones, are
joined (reassembly.py) before decapsulation. The filter and the reader walk
an IPsec Authentication Header (IPv4 and IPv6) and, over IPv6, up to six
extension headers in all (hop-by-hop, routing, destination options, Fragment,
AH; in a fragmented packet's first fragment, those after the Fragment header
too) to GRE/UDP; ESP is encrypted: dropped. The kernel copies each
packet once into the ring and hands over whole blocks: no system call per
packet, 64 MB of room for bursts, and what the ring had no room for is
counted (Termination.dropped). Each block is parsed, and its pcapng built
and written, at once (tunnelblock.py). A raw socket (protocol 47) or UDP socket
bound to ADDR[:PORT] stays open beside it, with a filter that drops
everything: it checks that ADDR is ours and the port free, and its
presence keeps the kernel from answering with ICMP "protocol unreachable"
or "port unreachable".
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from vtap_core.errors import NotFound, OperationFailed, ValidationError
from vtap_core.model import ERSPAN_ID_MAX, GRE_KEY_MAX, VNI_MAX, VXLAN_DEFAULT_PORT, check_int
from vtap_drivers.linux import capture
from vtap_drivers.linux.pcapng import PcapngWriter
from vtap_drivers.linux.reassembly import EXTENSIONS, IPPROTO_AH, IPPROTO_FRAGMENT, IPV6_FRAGMENT_HEADER, MAX_EXTENSIONS, OFFSET_MASK
from vtap_drivers.linux.ring import PacketRing, attach_filter
from vtap_drivers.linux.tunnelblock import BlockReader

IPPROTO_GRE = 47
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPV6_HEADER = 40
# Classic BPF instructions, (code, jt, jf, k); jumps count instructions after the next one.
LD_W, LD_H, LD_B, LDX_MSH, LD_H_IND, LD_B_IND, LD_IMM, LD_MEM = 0x20, 0x28, 0x30, 0xB1, 0x48, 0x50, 0x00, 0x60
LDX_IMM, LDX_MEM, ST, ADD_K, ADD_X, LSH_K = 0x01, 0x61, 0x02, 0x04, 0x0C, 0x64
JA, JEQ, JGE, JSET, RET = 0x05, 0x15, 0x35, 0x45, 0x06
SKF_AD_PKTTYPE = 0xFFFFF000 + 4
PACKET_OTHERHOST = 3  # 3 and up: for another host's MAC, or sent by this one
KEEP_BYTES = 0x40000  # copy whole packets
STATS_INTERVAL = 1.0
DRAIN_LIMIT = 3.0  # seconds: after a stop, what the ring holds is still written for at most this long
TUNNEL_BLOCK_SIZE, TUNNEL_BLOCK_COUNT = 1 << 18, 256  # 64 MB
LISTEN_RULE = "write gre://ADDR[?key=N], erspan://ADDR[?id=N] or vxlan://ADDR[:PORT][?vni=N], ADDR a local IP address (0.0.0.0 or [::] for all)"
SELECTORS = {"gre": ("key", GRE_KEY_MAX), "erspan": ("id", ERSPAN_ID_MAX), "vxlan": ("vni", VNI_MAX)}


@dataclass(frozen=True)
class Listen:
    scheme: str  # gre | erspan | vxlan
    address: str
    port: int | None  # vxlan only
    only: int | None  # the key, session id or VNI to keep (None: all)
    text: str = ""  # as given: the if_name of the pcapng interfaces


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
    return Listen(scheme, host, port, only, text)


def open_gre_socket(address: str, netns: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = capture._socket_in(netns, family, socket.SOCK_RAW, IPPROTO_GRE)
    try:
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


def tunnel_filter(listen: Listen) -> list[tuple[int, int, int, int]]:
    """A classic BPF program for a packet socket reading IP packets (SOCK_DGRAM: from the IP header):
    keep the tunnel's packets to listen.address (any address for 0.0.0.0 / ::), drop the rest."""
    proto = socket.IPPROTO_UDP if listen.scheme == "vxlan" else IPPROTO_GRE
    if ":" in listen.address:
        return _ipv6_filter(listen, proto)
    program = [(LD_W, 0, 0, SKF_AD_PKTTYPE), (JGE, "drop", 0, PACKET_OTHERHOST)]
    address = int(ipaddress.IPv4Address(listen.address))
    if address:
        program += [(LD_W, 0, 0, 16), (JEQ, 0, "drop", address)]
    upper = "keep" if listen.port is None else "upper"
    program += [(LD_B, 0, 0, 9), (JEQ, upper, 0, proto), (JEQ, 0, "drop", IPPROTO_AH)]
    # Under an Authentication Header: a fragment past the first has no upper-layer header, it is kept (joined,
    # it is checked again); any other packet is walked past it (X = the IP header's length).
    program += [(LD_H, 0, 0, 6), (JSET, "keep", 0, OFFSET_MASK), (LDX_MSH, 0, 0, 0), *_length(2, 2), *NEXT_HEADER, (JEQ, 0, "drop", proto)]
    if listen.port is not None:
        program += [(JA, 0, 0, "port"), "upper", (LDX_MSH, 0, 0, 0), "port"]  # X: where the UDP header starts
        # A fragment (more fragments, or an offset) is kept whatever its port: joined, it is checked again.
        program += [(LD_H, 0, 0, 6), (JSET, "keep", 0, 0x3FFF), (LD_H_IND, 0, 0, 2), (JEQ, "keep", "drop", listen.port)]
    program += ["keep", (RET, 0, 0, KEEP_BYTES), "drop", (RET, 0, 0, 0)]
    return _assemble(program)


def _length(extra: int, shift: int) -> list:
    """A = the length of the header at X, (its length byte + extra) << shift: 1, 3 for IPv6 extension headers
    (8 octets, the first 8 not counted), 2, 2 for AH (4 octets, the first 8 not counted)."""
    return [(LD_B_IND, 0, 0, 1), (ADD_K, 0, 0, extra), (LSH_K, 0, 0, shift)]


# From the header at X, A bytes long: A = its next header code, X = where that starts (M[0] on the way).
NEXT_HEADER = [(ADD_X, 0, 0, 0), (ST, 0, 0, 0), (LD_B_IND, 0, 0, 0), (LDX_MEM, 0, 0, 0)]


def _ipv6_filter(listen: Listen, proto: int) -> list[tuple[int, int, int, int]]:
    """tunnel_filter() for IPv6: past up to MAX_EXTENSIONS hop-by-hop, routing, destination options, AH and
    Fragment headers (X: where the next one starts), proto (to the port) is kept, fragments whatever the port
    (joined, it is checked again). A fragment past the first has no upper-layer header: kept if its Fragment
    header says proto or another header walked here. More headers than walked, or ESP: dropped."""
    program = [(LD_W, 0, 0, SKF_AD_PKTTYPE), (JGE, "drop", 0, PACKET_OTHERHOST)]
    words = struct.unpack("!4I", ipaddress.IPv6Address(listen.address).packed)
    if any(words):
        for i, word in enumerate(words):
            program += [(LD_W, 0, 0, 24 + 4 * i), (JEQ, 0, "drop", word)]
    # M[1]: 1 once past a first fragment's Fragment header (its port is not checked); only when there is a port.
    first_fragment = [(LD_IMM, 0, 0, 1), (ST, 0, 0, 1)] if listen.port is not None else []
    program += [(LD_IMM, 0, 0, 0), (ST, 0, 0, 1)] if first_fragment else []
    program += [(LD_B, 0, 0, 6), (LDX_IMM, 0, 0, IPV6_HEADER)]  # A: the next header, X: where it starts
    for n in range(MAX_EXTENSIONS):
        program += [(JEQ, f"options{n}", 0, code) for code in sorted(EXTENSIONS)]
        program += [(JEQ, f"ah{n}", 0, IPPROTO_AH), (JEQ, 0, "upper", IPPROTO_FRAGMENT)]
        # The Fragment header: a fragment past the first (an offset, in 8 octets from bit 3) goes to "later".
        program += [(LD_H_IND, 0, 0, 2), (JSET, "later", 0, 0xFFF8), *first_fragment, (LD_IMM, 0, 0, IPV6_FRAGMENT_HEADER), (JA, 0, 0, f"next{n}")]
        program += [f"ah{n}", *_length(2, 2), (JA, 0, 0, f"next{n}")]
        program += [f"options{n}", *_length(1, 3), f"next{n}", *NEXT_HEADER]
    if listen.port is None:
        program += ["upper", (JEQ, "keep", "drop", proto)]
    else:
        program += ["upper", (JEQ, 0, "drop", proto), (LD_MEM, 0, 0, 1), (JEQ, "keep", 0, 1), (LD_H_IND, 0, 0, 2), (JEQ, "keep", "drop", listen.port)]
    *walked, last = (proto, *sorted(EXTENSIONS), IPPROTO_AH)
    program += ["later", (LD_B_IND, 0, 0, 0), *((JEQ, "keep", 0, code) for code in walked), (JEQ, "keep", "drop", last)]
    program += ["keep", (RET, 0, 0, KEEP_BYTES), "drop", (RET, 0, 0, 0)]
    return _assemble(program)


def _assemble(program: list) -> list[tuple[int, int, int, int]]:
    """Instructions and labels (strings) -> instructions whose jumps (jt, jf, or k of JA) name a label resolved
    to the count of instructions to skip."""
    places, at = {}, 0
    for item in program:
        if isinstance(item, str):
            places[item] = at
        else:
            at += 1
    out = []
    for item in program:
        if not isinstance(item, str):
            here = len(out) + 1
            out.append(tuple(places[field] - here if isinstance(field, str) else field for field in item))
            if not 0 <= out[-1][1] <= 255 or not 0 <= out[-1][2] <= 255:
                raise ValueError(f"instruction {here - 1}: a conditional jump reaches 255 instructions at most")
    return out


def open_tunnel_ring(listen: Listen, netns: str | None = None) -> PacketRing:
    ipv6 = ":" in listen.address
    # Small blocks, many of them: a block is handed over when full or RETIRE_MS old, so at a modest
    # rate each holds little; 256 of 256 KB still buffer 5 s of a slow stream (64 of 1 MB: 1.3 s).
    return PacketRing(None, netns, program=tunnel_filter(listen), protocol=ETH_P_IPV6 if ipv6 else ETH_P_IP, kind=socket.SOCK_DGRAM, block_size=TUNNEL_BLOCK_SIZE, block_count=TUNNEL_BLOCK_COUNT)


@dataclass
class Termination:
    kept: int = 0  # inner frames written / re-emitted
    dropped: int = 0  # tunnel packets the kernel had no room for in the ring
    ignored: int = 0  # tunnel packets not kept: another key/session/VNI, not a frame, cut short
    unread: int = 0  # tunnel packets still in the ring when it stopped (count reached, or more than a drain)


def terminate(listen_text: str, path: str | None = None, to: str | None = None, count: int | None = None, duration: float | None = None, stop: threading.Event | None = None, netns: str | None = None) -> int:
    """Terminate a tunnel until count, duration, stop or Ctrl-C; returns the number of inner frames kept."""
    return terminate_counted(listen_text, path, to, count, duration, stop, netns).kept


def terminate_counted(listen_text: str, path: str | None = None, to: str | None = None, count: int | None = None, duration: float | None = None, stop: threading.Event | None = None, netns: str | None = None) -> Termination:
    """terminate(), returning what was kept, dropped by the kernel and ignored."""
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
    sock = ring = writer = None
    counts = Termination()
    try:
        # The ring before the socket: once the socket is seen listening, nothing is missed.
        ring = open_tunnel_ring(listen, netns)
        # The socket says whether ADDR is ours and the port free; its filter keeps its queue empty.
        sock = capture.open_vxlan_socket(listen.address, listen.port, netns) if listen.scheme == "vxlan" else open_gre_socket(listen.address, netns)
        attach_filter(sock, [(RET, 0, 0, 0)])
        writer = PcapngWriter.create(path, interface=False) if path is not None else None  # tunnelblock.py writes one per stream
        with _stopped_by_signals(stop):
            _read_ring(listen, ring, writer, out, to, counts, stop, count, deadline)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user ends an open-ended capture
    finally:
        if ring is not None:
            counts.dropped += ring.statistics()[1]
            counts.unread = ring.unread()
        if writer is not None:
            writer.close()
        for s in (ring, sock, out):
            if s is not None:
                s.close()
    return counts


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event):
    """Ctrl-C or SIGTERM sets `stop`: what is already in the ring is still written (not lost mid-block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _read_ring(listen, ring, writer, out, to, counts, stop, count, deadline) -> None:
    """Block by block: tunnelblock.py parses a block and builds its pcapng in one buffer, written at once."""
    reader = BlockReader(listen, keep_frames=out is not None)
    next_stats = time.monotonic() + STATS_INTERVAL

    def should_stop():
        nonlocal next_stats
        now = time.monotonic()
        if now >= next_stats:
            counts.dropped += ring.statistics()[1]
            next_stats = now + STATS_INTERVAL
        return stop.is_set() or (count is not None and counts.kept >= count) or (deadline is not None and now >= deadline)

    def on_idle():
        if writer is not None:
            writer.flush()

    for offset in ring.block_offsets(should_stop, on_idle, drain_limit=DRAIN_LIMIT):
        blocks, kept, ignored, frames = reader.read(ring.map, offset, None if count is None else count - counts.kept)
        if writer is not None and blocks:
            writer.write_blocks(blocks, kept)
        for frame in frames or ():
            try:
                out.send(frame)
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.ENETDOWN, errno.EMSGSIZE):
                    raise OperationFailed(f"--to {to}: {exc.strerror}") from None
        counts.kept += kept
        counts.ignored += ignored
        if counts.kept == count:
            return
