"""A memory-mapped receive ring on an AF_PACKET socket (TPACKET_V3), as libpcap reads devices.

The kernel copies each frame once, into blocks of a ring shared with this
process, and hands over a whole block at a time (when it is full, or after
RETIRE_MS): no system call per frame. A classic BPF program on the socket
keeps only frames the device transmits (PACKET_OUTGOING: what mirred produces
on the sink) and tells the kernel how much of each to copy (the snaplen), so
nothing else costs a copy.

    ring = PacketRing(device, netns=None, snaplen=None)
    for block in ring.blocks(should_stop, on_idle):     # until should_stop(), then drained
        for frame, timestamp_ns, original_length in block:
            ...                                          # frame: a view into the ring, valid
                                                         # until the next block is asked for
    ring.statistics()  -> (frames received, dropped, times the ring was full)   since the last call
    ring.unread()                                       # frames handed over but not read (after a stop)
    ring.rebind_if_recreated()                          # follow a sink recreated under its name
    ring.close()

802.1Q tags the kernel moved into metadata are put back into the frame
(tp_vlan_tci / tp_vlan_tpid of tpacket_hdr_variant1). The socket is never
put in promiscuous mode.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import time

from vtap_core.errors import NotFound

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
SIOCGIFINDEX = 0x8933

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6

# A block holds many frames, or a few GSO super-frames of a TSO stream (~64 KB each).
BLOCK_SIZE = 1 << 20
BLOCK_COUNT = 64  # 64 MB: what the socket buffer needed for bursts of a 7 Gbit/s TCP stream
FRAME_SIZE = 1 << 11  # only for the kernel's bookkeeping; V3 packs frames by their real size
RETIRE_MS = 20  # a block that is not full is handed over after this long: the file stays fresh
MAX_SNAPLEN = 262144

TPACKET_REQ3 = struct.Struct("7I")
BLOCK_HEADER = struct.Struct("III")  # block_status, num_pkts, offset_to_first_pkt (at offset 8)
BLOCK_STATUS_OFFSET = 8
# struct tpacket3_hdr up to tpacket_hdr_variant1: next, sec, nsec, snaplen, len, status, mac, net, rxhash, vlan_tci, vlan_tpid
FRAME_HEADER = struct.Struct("IIIIIIHHIIH")
PKTTYPE_OFFSET = 48 + 10  # sockaddr_ll (after the 48-byte header) -> sll_pkttype
STATS_V3 = struct.Struct("III")  # tp_packets (includes drops), tp_drops, tp_freeze_q_cnt

# Classic BPF: ld pkttype; jeq PACKET_OUTGOING ? ret snaplen : ret 0
SKF_AD_PKTTYPE = 0xFFFFF000 + 4
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF program, (code, jt, jf, k) per instruction, to any socket."""
    instructions = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), instructions)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(memoryview(fprog)))  # the kernel copies it


def _outgoing_filter(snaplen: int) -> list[tuple[int, int, int, int]]:
    return [
        (BPF_LD_W_ABS, 0, 0, SKF_AD_PKTTYPE),
        (BPF_JEQ_K, 0, 1, socket.PACKET_OUTGOING),
        (BPF_RET_K, 0, 0, snaplen),
        (BPF_RET_K, 0, 0, 0),
    ]


def _socket_in(netns: str | None, kind: int = socket.SOCK_RAW) -> socket.socket:
    """A packet socket of no protocol: it sees nothing until bind() names the device and protocol."""
    if netns is None:
        return socket.socket(socket.AF_PACKET, kind, 0)
    from pyroute2 import netns as pr_netns

    try:
        # Made in a short-lived child, so no thread of ours changes namespace; flags=0: never create one.
        return pr_netns.create_socket(netns, socket.AF_PACKET, kind, 0, flags=0)
    except FileNotFoundError:
        raise NotFound(f"netns {netns}: no such network namespace") from None


def _bind_every_device(sock: socket.socket, protocol: int) -> None:
    """bind() with interface index 0: every device (Python's bind() wants a device name)."""
    address = struct.pack("=HHiHBB8x", socket.AF_PACKET, socket.htons(protocol), 0, 0, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.bind(sock.fileno(), ctypes.c_char_p(address), len(address)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def ifindex(sock: socket.socket, device: str) -> int | None:
    """The index of `device` in the socket's own namespace, or None when there is none."""
    request = struct.pack("16sI12x", device.encode(), 0)
    try:
        return struct.unpack("16sI12x", fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, request))[1]
    except OSError:
        return None


class PacketRing:
    """By default: the frames `device` transmits. With program (classic BPF), protocol and kind, any
    packets: e.g. SOCK_DGRAM, ETH_P_IP and device None read IPv4 packets (from their IP header) of
    every device, where the IP stack receives them (tunnel termination, terminate.py)."""

    def __init__(self, device: str | None, netns: str | None = None, snaplen: int | None = None, block_size: int = BLOCK_SIZE, block_count: int = BLOCK_COUNT, program=None, protocol: int = ETH_P_ALL, kind: int = socket.SOCK_RAW):
        self.device = device
        self.block_size, self.block_count = block_size, block_count
        self.protocol = protocol
        self.sock = _socket_in(netns, kind)
        try:
            # The filter goes on before the socket is bound: no frame of another kind is ever queued.
            attach_filter(self.sock, program or _outgoing_filter(min(snaplen or MAX_SNAPLEN, MAX_SNAPLEN)))
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            request = TPACKET_REQ3.pack(block_size, block_count, FRAME_SIZE, block_size // FRAME_SIZE * block_count, RETIRE_MS, 0, 0)
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)
            self.map = mmap.mmap(self.sock.fileno(), block_size * block_count, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.map)
            if device:
                self.sock.bind((device, protocol))
            else:
                _bind_every_device(self.sock, protocol)
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENODEV:
                where = f" in netns {netns}" if netns else ""
                raise NotFound(f"device {device}: no such device{where}") from None
            raise
        self.bound = ifindex(self.sock, device) if device else None
        self.next_block = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def _ready_block(self) -> int | None:
        """The offset of the next block the kernel has handed over, or None."""
        offset = self.next_block * self.block_size
        if self.map[offset + BLOCK_STATUS_OFFSET] & TP_STATUS_USER:
            return offset
        return None

    def _frames(self, offset: int):
        ring, view = self.map, self.view
        _status, count, position = BLOCK_HEADER.unpack_from(ring, offset + BLOCK_STATUS_OFFSET)
        position += offset
        unpack = FRAME_HEADER.unpack_from
        for _ in range(count):
            following, sec, nsec, captured, length, status, mac, _net, _hash, tci, tpid = unpack(ring, position)
            start = position + mac
            frame = view[start : start + captured]
            if status & TP_STATUS_VLAN_VALID:
                # The frame as it was on the wire: the tag back after the two MAC addresses.
                tag = struct.pack("!HH", tpid if status & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100, tci)
                frame = bytes(frame[:12]) + tag + bytes(frame[12:])
                length += 4
            yield frame, sec * 1_000_000_000 + nsec, length
            position += following

    def _release(self, offset: int) -> None:
        """Give the block back to the kernel; the next one in the ring is the next to read."""
        struct.pack_into("I", self.map, offset + BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)
        self.next_block = (self.next_block + 1) % self.block_count

    def blocks(self, should_stop, on_idle=lambda: None, drain_quiet: float = 5 * RETIRE_MS / 1000, drain_limit: float = 3.0):
        """Yield blocks (iterables of (frame, timestamp ns, length on the wire)) until should_stop().

        on_idle() runs whenever no block is waiting. After should_stop(), what is
        still in the ring is read too: blocks are handed over until the ring
        has been quiet for drain_quiet seconds (a partly filled block is
        handed over after RETIRE_MS), at most drain_limit seconds.
        """
        for offset in self.block_offsets(should_stop, on_idle, drain_quiet, drain_limit):
            yield self._frames(offset)

    def block_offsets(self, should_stop, on_idle=lambda: None, drain_quiet: float = 5 * RETIRE_MS / 1000, drain_limit: float = 3.0):
        """As blocks(), but the offset in self.map of each block, for a reader that parses it itself."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR)
        drain_until = quiet_until = None
        while True:
            now = time.monotonic()
            # Asked on every block, too: a ring that is never empty must still stop.
            if drain_until is None and should_stop():
                drain_until, quiet_until = now + drain_limit, now + drain_quiet
            if drain_until is not None and now >= drain_until:
                return
            offset = self._ready_block()
            if offset is not None:
                yield offset
                self._release(offset)  # read or not: the caller has asked for the next block
                if drain_until is not None:
                    quiet_until = time.monotonic() + drain_quiet
                continue
            if drain_until is not None and now >= quiet_until:
                return
            on_idle()
            for _fd, events in poller.poll(RETIRE_MS * 10 if drain_until is None else RETIRE_MS):
                if events & select.POLLERR:
                    # A packet socket reports its device going down once (ENETDOWN); it is not fatal.
                    self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def rebind_if_recreated(self) -> None:
        now = ifindex(self.sock, self.device) if self.device else None
        if now is not None and now != self.bound:
            self.sock.bind((self.device, self.protocol))
            self.bound = now

    def unread(self) -> int:
        """Frames in blocks the kernel has handed over and nobody has read yet (left behind at a stop)."""
        frames = 0
        for step in range(self.block_count):
            offset = (self.next_block + step) % self.block_count * self.block_size
            status, count, _first = BLOCK_HEADER.unpack_from(self.map, offset + BLOCK_STATUS_OFFSET)
            if not status & TP_STATUS_USER:
                break
            frames += count
        return frames

    def statistics(self) -> tuple[int, int, int]:
        """(frames received, frames dropped because the ring was full, times it was full) since the last call."""
        received, dropped, frozen = STATS_V3.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, STATS_V3.size))
        return received, dropped, frozen

    def close(self) -> None:
        ring = getattr(self, "map", None)
        if ring is not None:
            try:
                self.view.release()
                ring.close()
            except BufferError:
                pass  # a frame view is still alive; the socket's close frees the ring anyway
        self.sock.close()
