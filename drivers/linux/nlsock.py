"""A plain rtnetlink socket for the dataplane's hot paths: many requests per send, dumps read directly.

pyroute2 0.9 runs an asyncio loop and decodes every attribute of every
message for each request: about a millisecond each, which is seconds for a
thousand mirrors. Here the socket is still made by pyroute2 (inside the
namespace), but requests are packed bodies (tcnl.py), acks are read for a
whole batch at once, and replies are decoded by a small attribute walker
that reads only the few attributes vtap needs.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_MULTI = 2
NLMSGERR_ATTR_MSG = 1
NLA_TYPE_MASK = 0x3FFF
HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
ATTR = struct.Struct("=HH")  # struct nlattr
SEND_CHUNK = 64 * 1024
RECEIVE_BUFFER = 8 << 20
# Dump replies come in skbs of at most 32 KiB (the kernel sizes them by our reads, capped there).
RECEIVE_SIZE = 64 * 1024
# Gets asked for in one send (gets()): each answer holds a few KiB of the receive buffer until read.
GET_WINDOW = 256


class NetlinkFailure(Exception):
    def __init__(self, code: int, text: str = ""):
        self.code = code
        self.text = text
        super().__init__(text or os.strerror(code))


def attributes(data, start: int, end: int) -> dict[int, tuple[int, int]]:
    """{attribute type: (payload start, payload end)} of the attributes in data[start:end]."""
    found = {}
    while start + ATTR.size <= end:
        length, kind = ATTR.unpack_from(data, start)
        if length < ATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = (start + ATTR.size, start + length)
        start += (length + 3) & ~3
    return found


def pick(data, start: int, end: int, wanted) -> dict[int, tuple[int, int]]:
    """attributes(), keeping only the types in `wanted` (a link reply has some forty; vtap reads five)."""
    found = {}
    unpack = ATTR.unpack_from
    while start + 4 <= end:
        length, kind = unpack(data, start)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind in wanted:
            found[kind] = (start + 4, start + length)
        start += (length + 3) & ~3
    return found


def find(data, start: int, end: int, kind: int) -> tuple[int, int] | None:
    """(payload start, payload end) of the first attribute of this type in data[start:end], or None."""
    while start + ATTR.size <= end:
        length, found = ATTR.unpack_from(data, start)
        if length < ATTR.size:
            return None
        if found & NLA_TYPE_MASK == kind:
            return start + ATTR.size, start + length
        start += (length + 3) & ~3
    return None


def string(data, span) -> str:
    return bytes(data[span[0] : span[1]]).split(b"\0", 1)[0].decode(errors="replace")


def u32(data, span) -> int:
    return struct.unpack_from("=I", data, span[0])[0]


class RtnlSocket:
    """One NETLINK_ROUTE socket, in `netns` when given (the namespace must exist)."""

    def __init__(self, netns: str | None = None):
        if netns:
            from pyroute2 import netns as pr_netns

            try:
                self.sock = pr_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
            except FileNotFoundError:
                raise FileNotFoundError(f"netns {netns}: no such network namespace") from None
        else:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # the kernel's own words for an error
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without a copy of the request
        self.sock.bind((0, 0))
        self._sequence = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def _frame(self, body: bytes, msg_type: int, flags: int) -> tuple[int, bytes]:
        """A request: our header, then the packed body."""
        sequence = next(self._sequence)
        return sequence, HEADER.pack(HEADER.size + len(body), msg_type, flags, sequence, 0) + body

    def requests(self, items) -> list[NetlinkFailure | None]:
        """Send [(body, type, flags)] (flags with NLM_F_ACK), a chunk per send; the error of each, in order."""
        framed = [self._frame(message, msg_type, flags) for message, msg_type, flags in items]
        results: dict[int, NetlinkFailure | None] = {}
        chunk = b""
        pending = set()
        for sequence, data in framed:
            if len(chunk) + len(data) > SEND_CHUNK:
                self._send_and_collect(chunk, pending, results)
                chunk, pending = b"", set()
            chunk += data
            pending.add(sequence)
        if chunk:
            self._send_and_collect(chunk, pending, results)
        return [results[sequence] for sequence, _ in framed]

    def _send_and_collect(self, chunk: bytes, pending: set, results: dict) -> None:
        self.sock.send(chunk)
        while pending:
            data = self.sock.recv(RECEIVE_SIZE)
            for msg_type, _flags, sequence, start, end in _messages(data):
                if msg_type == NLMSG_ERROR and sequence in pending:
                    results[sequence] = _error(data, start, end)
                    pending.discard(sequence)

    def _replies(self, body: bytes, msg_type: int, flags: int):
        """(type, buffer, payload start, payload end) of each message answering this request, as they come."""
        sequence, data = self._frame(body, msg_type, flags)
        self.sock.send(data)
        while True:
            data = self.sock.recv(RECEIVE_SIZE)
            for reply_type, _flags, reply_sequence, start, end in _messages(data):
                if reply_sequence == sequence:  # others are acks left over from earlier gets
                    yield reply_type, data, start, end

    def dump(self, body: bytes, msg_type: int, flags: int) -> list[tuple[bytes, int, int]]:
        """A dump's replies as (buffer, payload start, payload end), until NLMSG_DONE."""
        return list(self.stream(body, msg_type, flags))

    def stream(self, body: bytes, msg_type: int, flags: int):
        """dump(), a reply at a time: each datagram is let go once read (a dump of thousands of
        links or actions is tens of MiB). Read it to the end; a socket left half way is closed."""
        for reply_type, data, start, end in self._replies(body, msg_type, flags):
            if reply_type == NLMSG_DONE:
                return
            if reply_type == NLMSG_ERROR:
                failure = _error(data, start, end)
                if failure is not None:
                    raise failure
                return
            yield data, start, end

    def gets(self, bodies, msg_type: int, window: int = GET_WINDOW):
        """Many gets of one type, a window of requests per send: (index in bodies, (buffer, start, end) or
        the NetlinkFailure) of each, as they come. Without NLM_F_ACK each request has one answer: its
        reply or its error. (Dumps cannot be asked for so: the kernel runs one at a time per socket.)"""
        bodies = enumerate(bodies)  # framed a window at a time: thousands of requests are never all in memory
        while True:
            waiting: dict[int, int] = {}  # sequence -> index in bodies
            chunk = []
            for index, body in itertools.islice(bodies, window):
                sequence, data = self._frame(body, msg_type, NLM_F_REQUEST)
                waiting[sequence] = index
                chunk.append(data)
            if not chunk:
                return
            self.sock.send(b"".join(chunk))
            recv, unpack = self.sock.recv, HEADER.unpack_from
            while waiting:
                data = recv(RECEIVE_SIZE)
                offset = 0
                while offset + HEADER.size <= len(data):  # _messages(), written out: a reply a datagram, 20,000 of them
                    length, reply_type, _flags, sequence, _pid = unpack(data, offset)
                    if length < HEADER.size:
                        break
                    start, end, offset = offset + HEADER.size, offset + length, offset + ((length + 3) & ~3)
                    if sequence not in waiting:
                        continue  # an ack left over from an earlier get
                    if reply_type == NLMSG_ERROR:
                        yield waiting.pop(sequence), _error(data, start, end) or NetlinkFailure(errno.EIO, "acknowledged without a reply")
                    else:
                        yield waiting.pop(sequence), (data, start, end)

    def get(self, body: bytes, msg_type: int, flags: int) -> tuple[bytes, int, int]:
        """The one reply (buffer, start, end) to a get request, or raise NetlinkFailure."""
        for reply_type, data, start, end in self._replies(body, msg_type, flags):
            if reply_type != NLMSG_ERROR:
                return data, start, end
            # The ack came first: the kernel had nothing to show (a qdisc get of a built-in noqueue).
            raise _error(data, start, end) or NetlinkFailure(errno.ENOENT, "acknowledged without a reply")
        raise NetlinkFailure(errno.EIO, "no reply")


def _messages(data):
    """(type, flags, sequence, payload start, payload end) of each message in a datagram."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, msg_type, flags, sequence, _pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            break
        yield msg_type, flags, sequence, offset + HEADER.size, offset + length
        offset += (length + 3) & ~3


def _error(data, start: int, end: int) -> NetlinkFailure | None:
    code = -struct.unpack_from("=i", data, start)[0]
    if code == 0:
        return None
    # struct nlmsgerr: error + the request's header (capped: no body), then extended-ack attributes.
    found = attributes(data, start + 4 + HEADER.size, end)
    text = string(data, found[NLMSGERR_ATTR_MSG]) if NLMSGERR_ATTR_MSG in found else ""
    return NetlinkFailure(code or errno.EIO, text)
