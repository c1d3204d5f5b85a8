"""A pcap sink's BPF ring buffer (BPF_MAP_TYPE_RINGBUF): mirrors write frames, the capture reads them.

A mirror whose target is a pcap sink does not clone the packet to the sink
device: its program (tcxprog.translate with a RingAction; on the tcx hook, or
on tc as a direct-action cls_bpf filter, ringfilter.py) reserves
a record in the sink's ring buffer, fills it and submits it. No skb is made, so
nothing is transmitted on the sink; the capture process (capture.py) reads the
records from a shared mapping and writes them as pcapng Enhanced Packet Blocks.

The ring is pinned beside the tcx mirror pins, as

    /sys/fs/bpf/vtap/<host | ns-NAME>/ring-<sink device>

("ring" is no mark: tcxmirror.pins() skips it), made when the sink binding is
applied and unlinked when it is removed. The programs writing to it and the
capture process reading it hold it by fd; the pin is how they find it.

A record (after the kernel's own 8-byte header: length with busy/discard bits,
page offset) is RECORD_HEAD, then the first `captured` bytes of the frame:

    u64 TAI time in ns (bpf_ktime_get_tai_ns: the reader subtracts TAI - UTC)
    u32 length on the wire (skb->len), u32 captured = min(length, snaplen)
    u32 ifindex, u32 vlan_tci, u32 vlan_proto (as __sk_buff: a be16 in a u32),
    u32 flags: bits 0-1 direction as pcapng's epb_flags (1 inbound, 2 outbound), bit 4 a tag in metadata

At tc the 802.1Q tag the kernel took off is in skb metadata, not in the bytes:
the reader puts it back after the two MAC addresses, as ring.py does.

The consumer side follows the ring buffer's mmap layout (kernel/bpf/ringbuf.c):
page 0 the consumer position (read-write), page 1 the producer position (read
only), then the data, mapped twice in a row so a record never wraps. On x86 a
plain load is an acquire and a plain store a release, which is what the
positions need; but each must be ONE 8-byte access. With the consumer position
stored through struct.pack_into("=Q") (a standard-size packer, not promised to
be one store) the kernel refused ~1 in 100,000 reserves with the ring nearly
empty; stored through ctypes, none (test_tcx_ring.py). So the positions are
read through a "Q" memoryview and written through ctypes. Elsewhere (arm64, ...)
plain accesses order nothing, and Python has no barrier to add: sinks get no
ring there (usable_here), and their mirrors clone as on datapath=tc.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import select
import socket
import struct
import time

from vtap_drivers.linux import bpfsys
from vtap_drivers.linux.pcapng import EPB_TYPE
from vtap_drivers.linux.sinkblock import _shape, large_epb, tagged_epb

MAP_TYPE_RINGBUF = 27
RING_BYTES = 64 << 20  # as ring.py's AF_PACKET ring: 64 MB of kernel memory per pcap session
RING_BYTES_ENV = "VTAP_TEST_BPF_RING_BYTES"  # tests only: a tiny ring fills at once
PAGE = mmap.PAGESIZE
BUSY_BIT, DISCARD_BIT = 1 << 31, 1 << 30
KERNEL_HEAD = 8
RECORD_HEAD = struct.Struct("<QIIIIII")  # the program's header: see the module docstring
HEAD = struct.Struct("<I4xQIIIIII")  # the kernel's length word (pg_off skipped) + RECORD_HEAD
DIRECTION_IN, DIRECTION_OUT, VLAN_PRESENT = 1, 2, 1 << 4
PREFIX = "ring-"
WRITER_PREFIX = "prog-"  # a datapath=tc ring writer's program, pinned as prog-<mark hex> (ringfilter.py)
LARGE = 2048  # as sinkblock.py: a frame this long is written from the mapping, not copied first


def usable_here() -> bool:
    """Whether this machine's plain loads and stores order the ring's positions (x86's TSO does)."""
    return platform.machine() in ("x86_64", "i386", "i686")


def ring_bytes() -> int:
    """The ring's size: 64 MB, or (tests) VTAP_TEST_BPF_RING_BYTES rounded up to a power of two pages."""
    asked = os.environ.get(RING_BYTES_ENV)
    if not asked:
        return RING_BYTES
    size = PAGE
    while size < int(asked):
        size *= 2
    return size


def ring_path(pin_dir: str, device: str) -> str:
    return os.path.join(pin_dir, PREFIX + device)


def ring_devices(pin_dir: str) -> list[str]:
    """The sink devices that have a ring pinned in pin_dir."""
    try:
        names = os.listdir(pin_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(name[len(PREFIX):] for name in names if name.startswith(PREFIX))


def create(name: str, size: int | None = None) -> bpfsys.BpfFd:
    """A new ring buffer map of `size` bytes (a power of two pages)."""
    attr = struct.pack("=IIIIIII16s", MAP_TYPE_RINGBUF, 0, 0, size or ring_bytes(), 0, 0, 0, bpfsys._object_name(name))
    fd, _ = bpfsys.bpf(bpfsys.MAP_CREATE, attr)
    return bpfsys.BpfFd(fd)


def ensure(path: str) -> None:
    """A ring pinned at path: the one there (a ring, as bpf(2) says), or a new one. The caller made the
    folder private (tcxmirror._private_dir)."""
    try:
        with bpfsys.get_pinned(path) as existing:
            if _map_type(existing) == MAP_TYPE_RINGBUF:
                return
        os.unlink(path)  # something else under our name: not a ring any reader could use
    except FileNotFoundError:
        pass
    with create("vtap_ring") as ring:
        bpfsys.pin(ring, path)
    os.chmod(path, 0o600)


def _map_type(obj: bpfsys.BpfFd) -> int | None:
    """The map type of an fd (None when it is no map)."""
    try:
        return bpfsys.map_info(obj).type
    except OSError:
        return None


def pinned_id(path: str) -> int | None:
    """The id of the map pinned at path, or None when there is none."""
    try:
        with bpfsys.get_pinned(path) as ring:
            return bpfsys.map_info(ring).id
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def program_maps(link_path: str) -> tuple:
    """The map ids the program of a pinned tcx link (or pinned ring writer) uses (a ring-writing mirror: its counters and its ring)."""
    try:
        with bpfsys.get_pinned(link_path) as link:
            if os.path.basename(link_path).startswith(WRITER_PREFIX):  # a program (datapath=tc), not a tcx link
                return bpfsys.prog_info(link).map_ids
            prog_id = bpfsys.link_info(link).prog_id
        with bpfsys.prog_by_id(prog_id) as prog:
            return bpfsys.prog_info(prog).map_ids
    except FileNotFoundError:
        return ()


class WriterDrops:
    """Copies the mirrors writing into one ring (tcx links, tc ring writers) could not put there (their third counter: ring full),
    added up since this object was made, also over mirrors removed since. Which mirrors write into the ring
    is looked up again (their pins' programs) only when the pin folder changed."""

    def __init__(self, ring_path: str, ring_id: int):
        self.folder, self.ring_id = os.path.dirname(ring_path), ring_id
        self.counters: dict[int, bpfsys.BpfFd] = {}  # map id -> the counters map of a mirror writing here
        self.seen: dict[int, int] = {}  # map id -> its count when last read
        self.total = 0
        self.stamp = self._stamp()
        self._find()
        # What the mirrors there counted before this reader began is not its loss; mirrors found later start at 0.
        self.seen = {map_id: self._read(counters) or 0 for map_id, counters in self.counters.items()}

    def _stamp(self) -> int | None:
        try:
            return os.stat(self.folder).st_mtime_ns
        except OSError:
            return None

    def update(self) -> int:
        stamp = self._stamp()
        if stamp != self.stamp:
            self.stamp = stamp
            self._find()
        for map_id, counters in self.counters.items():
            now = self._read(counters)
            if now is not None:
                self.total += max(0, now - self.seen.get(map_id, 0))
                self.seen[map_id] = now
        return self.total

    @staticmethod
    def _read(counters) -> int | None:
        from vtap_drivers.linux import tcxprog

        try:
            return tcxprog.read_counters(counters)["clone_failures"]
        except OSError:
            return None

    def _find(self) -> None:
        found = {}
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else []:
            if name.startswith(PREFIX):
                continue
            try:
                maps = program_maps(os.path.join(self.folder, name))
                if self.ring_id in maps[1:]:
                    found[maps[0]] = self.counters.pop(maps[0], None) or bpfsys.map_by_id(maps[0])
            except OSError:
                continue
        for gone in self.counters.values():
            gone.close()  # its drops stay in total
        self.counters = found

    def close(self) -> None:
        for counters in self.counters.values():
            counters.close()
        self.counters = {}


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def tai_offset_ns() -> int:
    """CLOCK_TAI - CLOCK_REALTIME now (37 s where the offset is set; 0 where it never was)."""
    return time.clock_gettime_ns(time.CLOCK_TAI) - time.time_ns()


class RingReader:
    """The consumer of a pinned ring buffer.

        reader = RingReader(path, snaplen)
        parts, frames = reader.read()      # EPBs of every record written since, the data still in the ring
        writer.write_epbs(parts, frames); reader.release()   # then the kernel may reuse that room
        reader.wait(timeout)               # until records are there (or timeout)
    """

    def __init__(self, path: str, snaplen: int | None = None):
        self.path, self.snaplen = path, snaplen
        self.records = 0
        self._open()

    def _open(self) -> None:
        self.ring = bpfsys.get_pinned(self.path)
        try:
            info = bpfsys.map_info(self.ring)
            self.id, self.size = info.id, info.max_entries
            self.consumer = mmap.mmap(self.ring.fileno(), PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self.producer = mmap.mmap(self.ring.fileno(), PAGE + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        except BaseException:
            self.ring.close()
            raise
        self.view = memoryview(self.producer)
        self.consumer_pos = ctypes.c_uint64.from_buffer(self.consumer)  # one 8-byte store per release()
        self.positions = (memoryview(self.consumer).cast("Q"), memoryview(self.producer)[:8].cast("Q"))
        self.poller = select.poll()
        self.poller.register(self.ring.fileno(), select.POLLIN)
        self.mask = self.size - 1
        self.pending = None  # the consumer position once what read() gave is written
        self.shapes = {}
        self.tai = tai_offset_ns()

    def available(self) -> bool:
        consumer, producer = self.positions
        return producer[0] != consumer[0]

    def wait(self, timeout_ms: int) -> None:
        self.poller.poll(timeout_ms)

    def read(self, limit: int = 1 << 16) -> tuple[list, int]:
        """(EPBs of up to `limit` records, as bytes-like parts; how many frames). The parts may be views
        into the ring: write them, then release(). At most a sixteenth of the ring at a time, so the
        kernel gets room back while a batch of large frames is written."""
        producer, view = self.producer, self.view
        position, end = self.positions[0][0], self.positions[1][0]
        end = min(end, position + self.size // 16)  # a record that starts before it is read whole
        mask, base, tai = self.mask, PAGE, self.tai
        parts, small, frames = [], [], 0
        append, head, shapes, snaplen = small.append, HEAD.unpack_from, self.shapes, self.snaplen
        while position < end and frames < limit:
            at = base + (position & mask)
            word, stamp, length, captured, _ifindex, tci, proto, flags = head(producer, at)
            if word & BUSY_BIT:
                break  # still being written: what follows waits for it
            position += ((word & ~(BUSY_BIT | DISCARD_BIT)) + KERNEL_HEAD + 7) & ~7
            if word & DISCARD_BIT:
                continue
            frames += 1
            start = at + HEAD.size
            timestamp = stamp - tai
            if flags & VLAN_PRESENT:
                append(tagged_epb(producer, start, captured, length, timestamp, socket.ntohs(proto & 0xFFFF) or 0x8100, tci & 0xFFFF, snaplen))
            elif captured < LARGE:
                pack, total = shapes.get(captured) or _shape(shapes, captured)
                append(pack(EPB_TYPE, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, captured, length, producer[start : start + captured], total))
            else:
                if small:
                    parts.append(b"".join(small))
                    small.clear()
                parts += large_epb(view, start, captured, length, timestamp)
        if small:
            parts.append(b"".join(small))
        self.pending = position
        self.records += frames
        return parts, frames

    def release(self) -> None:
        """Give the room of what read() returned back to the kernel."""
        if self.pending is not None:
            self.consumer_pos.value = self.pending
            self.pending = None

    def unread(self) -> int:
        """Bytes written and not yet consumed."""
        consumer, producer = self.positions
        return producer[0] - consumer[0]

    def recreated(self) -> bool:
        """Whether the pin now names another ring (or none): the sink was made anew."""
        return pinned_id(self.path) != self.id

    def reopen(self) -> None:
        """Read the ring now pinned at the path from here on (the old one is closed; none there: keep it)."""
        if pinned_id(self.path) is None:
            return
        self.close()
        self._open()

    def refresh_clock(self) -> None:
        self.tai = tai_offset_ns()

    def close(self) -> None:
        for view in (*getattr(self, "positions", ()), getattr(self, "view", None)):
            try:
                view.release()
            except (AttributeError, BufferError):
                pass
        self.consumer_pos = None  # holds the consumer mapping
        for mapping in (getattr(self, "producer", None), getattr(self, "consumer", None)):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    pass
        self.ring.close()
