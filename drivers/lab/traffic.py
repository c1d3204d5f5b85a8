"""Known frames in, frames counted out: the lab's traffic generator and sniffer.

Frames are built byte by byte (Ethernet/IPv4 with TCP, UDP or ICMP) and sent
with an AF_PACKET socket opened inside the sending namespace, so the count
sent of each kind is exact. The sniffer is an AF_PACKET socket bound to one
interface in another namespace that classifies what arrives. No promiscuous
mode is needed: mirrored frames are delivered to the port as if sent to it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections import Counter

from pyroute2 import netns

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ipv4_frame(src_mac, dst_mac, src_ip, dst_ip, proto: int, payload: bytes, ident: int = 1) -> bytes:
    src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, src, dst)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + header + payload


def _l4_checksum(src_ip, dst_ip, proto, segment: bytes) -> int:
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!BBH", 0, proto, len(segment))
    return checksum(pseudo + segment)


def tcp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, flags=0x02, seq=1, payload=b"") -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0) + payload
    segment = segment[:16] + struct.pack("!H", _l4_checksum(src_ip, dst_ip, 6, segment)) + segment[18:]
    return ipv4_frame(src_mac, dst_mac, src_ip, dst_ip, 6, segment, ident=seq & 0xFFFF)


def udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, payload=b"vtap") -> bytes:
    segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    segment = segment[:6] + struct.pack("!H", _l4_checksum(src_ip, dst_ip, 17, segment) or 0xFFFF) + segment[8:]
    return ipv4_frame(src_mac, dst_mac, src_ip, dst_ip, 17, segment)


def icmp_echo_frame(src_mac, dst_mac, src_ip, dst_ip, seq=1) -> bytes:
    message = struct.pack("!BBHHH", 8, 0, 0, 0x7674, seq) + b"vtap-lab"
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ipv4_frame(src_mac, dst_mac, src_ip, dst_ip, 1, message, ident=seq)


def classify(frame: bytes) -> str:
    """A short name for a frame: tcp/80, udp/53, icmp, arp, other."""
    if len(frame) < 14:
        return "other"
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0806:
        return "arp"
    if ethertype != 0x0800 or len(frame) < 34:
        return "other"
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    l4 = 14 + ihl
    if proto == 1:
        return "icmp"
    if proto in (6, 17) and len(frame) >= l4 + 4:
        dport = struct.unpack("!H", frame[l4 + 2 : l4 + 4])[0]
        return f"{'tcp' if proto == 6 else 'udp'}/{dport}"
    return "other"


def packet_socket(namespace: str | None, ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ifname inside namespace (sockets keep their namespace)."""
    if namespace:
        netns.pushns(namespace)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
    finally:
        if namespace:
            netns.popns()
    return sock


def send(namespace: str | None, ifname: str, frames: list[bytes], gap: float = 0.0) -> None:
    with packet_socket(namespace, ifname) as sock:
        for frame in frames:
            sock.send(frame)
            if gap:
                time.sleep(gap)


class Sniffer:
    """Counts, by kind and source MAC, the frames arriving on one interface."""

    def __init__(self, namespace: str | None, ifname: str):
        self.sock = packet_socket(namespace, ifname)
        self.counts: Counter = Counter()
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            frame, address = self.sock.recvfrom(65535)
            if address[2] == PACKET_OUTGOING:
                continue
            self.frames.append(frame)
            source = ":".join(f"{b:02x}" for b in frame[6:12])
            self.counts[(source, classify(frame))] += 1

    def settle(self, quiet: float = 0.2, limit: float = 3.0) -> Counter:
        """Wait until nothing has arrived for `quiet` seconds, then return the counts."""
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            now = sum(self.counts.values())
            if now == last:
                break
            last = now
            time.sleep(quiet)
        return Counter(self.counts)

    def reset(self):
        self.counts.clear()
        self.frames.clear()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
