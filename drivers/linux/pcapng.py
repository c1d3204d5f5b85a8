"""A small pcapng writer: one section, one interface, Enhanced Packet Blocks.

Follows the pcapng specification (IETF draft-ietf-opsawg-pcapng): a Section
Header Block, one Interface Description Block (link type, snaplen, if_name,
if_tsresol = nanoseconds) and one Enhanced Packet Block per frame with its
captured and original lengths. Frames longer than snaplen are cut to snaplen;
the original length is kept so readers show the truncation. (A terminated
tunnel writes its own Interface Description Blocks, one per stream:
tunnelblock.py.)

Everything is written little-endian; readers find the byte order from the
byte-order magic in the section header.
"""

from __future__ import annotations

import os
import struct
import time

from vtap_core.safefile import open_capture

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

LINKTYPE_ETHERNET = 1
IOV_MAX = 1024  # parts per writev (Linux's UIO_MAXIOV)

OPT_END = 0
OPT_COMMENT = 1
EPB_FLAGS = 2  # bits 0-1: direction, 01 inbound, 10 outbound
EPB_PACKETID = 5  # 64 bits that identify the packet (a terminated tunnel's GRE sequence number)
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
TSRESOL_NANOSECONDS = 9  # 10^-9 s per timestamp unit

# The block type of a section header, as its first four bytes appear in any file.
SHB_MAGIC_BYTES = struct.pack("<I", SHB_TYPE)


# An Enhanced Packet Block around a frame: type, length, interface, timestamp, lengths | frame | padding, length.
_EPB_HEAD = struct.Struct("<7I")
_EPB_TAILS = [struct.Struct(f"<{padding}xI") for padding in range(4)]


_PADDING = [b"\0" * padding for padding in range(4)]
_OPTION_HEAD = struct.Struct("<HH")
_FLAGS_OPTION = struct.Struct("<HHI")
_END_OF_OPTIONS = struct.pack("<HH", OPT_END, 0)


def _packet_options(comment: str | None, flags: int | None) -> bytes:
    """An Enhanced Packet Block's options (as _options() makes them), built the quick way: one per frame."""
    out = b""
    if comment:
        text = comment.encode()
        out = _OPTION_HEAD.pack(OPT_COMMENT, len(text)) + text + _PADDING[-len(text) & 3]
    if flags is not None:
        out += _FLAGS_OPTION.pack(EPB_FLAGS, 4, flags)
    return out + _END_OF_OPTIONS


def _pad(length: int) -> int:
    return (4 - length % 4) % 4


def _options(options: list[tuple[int, bytes]]) -> bytes:
    """Options as TLVs padded to 32 bits, ended by opt_endofopt (or nothing when empty)."""
    if not options:
        return b""
    out = bytearray()
    for code, value in options:
        out += struct.pack("<HH", code, len(value)) + value + b"\0" * _pad(len(value))
    out += struct.pack("<HH", OPT_END, 0)
    return bytes(out)


def _block(block_type: int, body: bytes) -> bytes:
    """A block: type, total length, body, total length again (body is already 32-bit aligned)."""
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header(application: str = "vtap") -> bytes:
    # Section length -1: unknown, because the file grows while being written.
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
    return _block(SHB_TYPE, body + _options([(SHB_USERAPPL, application.encode())]))


def interface_description(linktype: int = LINKTYPE_ETHERNET, snaplen: int | None = None, if_name: str | None = None, if_description: str | None = None) -> bytes:
    # Snaplen 0 means "no limit" in pcapng.
    options = [(IF_TSRESOL, bytes([TSRESOL_NANOSECONDS]))]
    if if_description:
        options.insert(0, (IF_DESCRIPTION, if_description.encode()))
    if if_name:
        options.insert(0, (IF_NAME, if_name.encode()))
    body = struct.pack("<HHI", linktype, 0, snaplen or 0)
    return _block(IDB_TYPE, body + _options(options))


def enhanced_packet(frame: bytes, timestamp_ns: int, original_length: int | None = None, snaplen: int | None = None, interface_id: int = 0, comment: str | None = None, flags: int | None = None, packet_id: int | None = None) -> bytes:
    original = len(frame) if original_length is None else original_length
    data = bytes(frame[:snaplen]) if snaplen else bytes(frame)
    header = struct.pack("<IIIII", interface_id, (timestamp_ns >> 32) & 0xFFFFFFFF, timestamp_ns & 0xFFFFFFFF, len(data), original)
    options = [(OPT_COMMENT, comment.encode())] if comment else []
    if packet_id is not None:
        options.append((EPB_PACKETID, struct.pack("<Q", packet_id)))
    if flags is not None:
        options.append((EPB_FLAGS, struct.pack("<I", flags)))
    return _block(EPB_TYPE, header + data + b"\0" * _pad(len(data)) + _options(options))


def _write_all(fd: int, parts: list) -> None:
    """os.writev, IOV_MAX parts at a time, until every byte is written."""
    parts = list(parts)
    done = 0
    while done < len(parts):
        chunk = parts[done : done + IOV_MAX]
        written = os.writev(fd, chunk)
        for part in chunk:
            if written < len(part):
                parts[done] = memoryview(part)[written:]
                break
            written -= len(part)
            done += 1


class PcapngWriter:
    """Writes frames of one interface to a binary stream.

    The caller decides when to flush(); close() flushes and closes the stream.
    A writer made by create() with max_size rotates: see rotate().
    With interface=False it writes no Interface Description Block: the caller
    writes its own with write_blocks() (tunnelblock.py).
    """

    def __init__(self, stream, snaplen: int | None = None, if_name: str | None = None, linktype: int = LINKTYPE_ETHERNET, path=None, max_size=None, max_files=None, size: int = 0, interface: bool = True):
        self.stream = stream
        self.interface = interface
        self.snaplen = snaplen
        self.if_name, self.linktype = if_name, linktype
        self.frames = 0
        self.path, self.max_size, self.max_files = path, max_size, max_files
        self.size = size  # bytes in the current file
        self._start_section()

    def _start_section(self) -> None:
        head = section_header() + (interface_description(self.linktype, self.snaplen, self.if_name) if self.interface else b"")
        self.stream.write(head)
        self.size += len(head)
        self.fresh = True  # no frame in this file yet: a frame larger than max_size still goes in

    @classmethod
    def create(cls, path: str, snaplen: int | None = None, if_name: str | None = None, append: bool = False, max_size: int | None = None, max_files: int | None = None, interface: bool = True) -> "PcapngWriter":
        """Open `path` for writing (mode 0600: captures hold other people's traffic).

        With append=True an existing pcapng file keeps its contents and gets a
        new section, which pcapng readers read as one file; a file that is not
        pcapng is refused rather than appended to. With max_size (and
        max_files), the file is rotated before it would grow beyond max_size.
        """
        fd = open_capture(path, append)  # refuses links, FIFOs, other users' files and files not pcapng
        try:
            size = os.fstat(fd).st_size if append else 0
            stream = os.fdopen(fd, "wb", buffering=1 << 16)
        except BaseException:
            os.close(fd)
            raise
        return cls(stream, snaplen=snaplen, if_name=if_name, path=path, max_size=max_size, max_files=max_files, size=size, interface=interface)

    def rotate(self) -> None:
        """Close the file, keep it as PATH.1 (PATH.1 becomes PATH.2, ...; at most max_files in all), start PATH anew.

        Renaming never follows a symlink, and the new file is created
        exclusively: a file or link someone put at PATH in between is refused.
        """
        self.stream.close()
        if self.max_files == 1:
            os.unlink(self.path)
        for older in range((self.max_files or 1) - 1, 0, -1):
            try:
                os.replace(self.path if older == 1 else f"{self.path}.{older - 1}", f"{self.path}.{older}")
            except FileNotFoundError:
                pass
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self.stream = os.fdopen(fd, "wb", buffering=1 << 16)
        self.size = 0
        self._start_section()

    def _make_room(self, total: int) -> None:
        """Rotate first if a block of total bytes would take the file past max_size (a file without a
        frame yet takes it anyway: a frame larger than max_size must go somewhere)."""
        if self.max_size and self.size + total > self.max_size and not self.fresh:
            self.rotate()

    def write(self, frame: bytes, timestamp_ns: int | None = None, original_length: int | None = None, comment: str | None = None, flags: int | None = None) -> None:
        """One Enhanced Packet Block, written without copying the frame (it may be a view into a ring).

        comment and flags (epb_flags) are the options a terminated tunnel's frames carry (terminate.py).
        """
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        captured = len(frame)
        original = captured if original_length is None else original_length
        if self.snaplen and captured > self.snaplen:
            frame, captured = frame[: self.snaplen], self.snaplen
        options = _packet_options(comment, flags) if comment or flags is not None else b""
        padding = -captured & 3
        total = 32 + captured + padding + len(options)
        self._make_room(total)
        self.size += total
        self.fresh = False
        write = self.stream.write
        write(_EPB_HEAD.pack(EPB_TYPE, total, 0, timestamp_ns >> 32 & 0xFFFFFFFF, timestamp_ns & 0xFFFFFFFF, captured, original))
        write(frame)
        if options:
            write(_PADDING[padding] + options)
        write(_EPB_TAILS[0 if options else padding].pack(total))
        self.frames += 1

    def write_blocks(self, blocks: bytes, frames: int) -> None:
        """Blocks already built (Enhanced Packet Blocks as write() builds them, Interface Description
        Blocks as interface_description() does: tunnelblock.py), written at once.

        For a writer without snaplen or max_size (the blocks are neither cut nor rotated).
        """
        if self.snaplen or self.max_size:
            raise ValueError("write_blocks: the writer cuts frames or rotates files")
        self.stream.write(blocks)
        self.size += len(blocks)
        self.frames += frames
        self.fresh = False

    def write_epbs(self, parts: list, frames: int) -> None:
        """Enhanced Packet Blocks as write() makes them, already cut to snaplen, in bytes-like parts (sinkblock.py),
        written at once; with max_size, the file is rotated between them just where write() would rotate it."""
        size = sum(map(len, parts))
        if not self.max_size or self.size + size <= self.max_size:
            if len(parts) == 1:
                self.stream.write(parts[0])
            elif parts:
                self.stream.flush()  # what is buffered goes first
                _write_all(self.stream.fileno(), parts)
            self.size += size
            self.frames += frames
            self.fresh = self.fresh and not frames
            return
        blocks = b"".join(parts)
        view, position = memoryview(blocks), 0
        while position < len(blocks):
            total = int.from_bytes(view[position + 4 : position + 8], "little")
            self._make_room(total)
            self.stream.write(view[position : position + total])
            self.size += total
            self.fresh = False
            self.frames += 1
            position += total

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if not self.stream.closed:
            self.stream.flush()
            self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
