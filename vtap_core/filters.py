"""pcap filter expressions (tcpdump syntax) -> classic BPF, through libpcap.

compile_filter("tcp port 80") returns a Program: a tuple of classic BPF
instructions (code, jt, jf, k) that the kernel runs in cls_bpf. An invalid
expression raises ValidationError("filter", <libpcap's own message>).

VLAN: at the tc ingress hook the kernel has already moved an 802.1Q tag out
of the frame into skb metadata; at the egress hook the tag is in metadata or
in the frame, depending on who built the frame. libpcap covers both (it tests
the SKF_AD_VLAN_TAG_PRESENT ancillary value, else the in-frame TPID) only when
its handle has BPF_SPECIAL_VLAN_HANDLING, which libpcap sets on live Linux
handles and never on pcap_open_dead. So we compile on a briefly activated,
non-promiscuous handle on "lo" when we may (root; if "lo" is down here, as in
a fresh namespace, on "lo" of a throwaway namespace), and on a dead handle
otherwise: the dead handle is good for validation, not for the kernel.

Opening that live handle costs 10-90 ms and compiling on it well under one:
one live handle serves every compile for a moment (HANDLE_IDLE) and is then
closed, so 2,000 distinct expressions do not open 2,000 handles. Programs
compiled once are kept across processes by filter_cache.FilterCache.

Sampling 1-in-N happens in the kernel too: with_sampling() prepends a test of
the SKF_AD_RANDOM ancillary value (rand % N == 0) to a program.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import os
import socket
import struct
import threading
import time
from typing import NamedTuple

from vtap_core.errors import ValidationError

DLT_EN10MB = 1
SNAPLEN = 262144  # libpcap's default: a match returns this (any non-zero means "match")
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
LIVE_DEVICE = b"lo"
LIVE_BUFFER_BYTES = 64 * 1024  # the handle never reads; keep its ring small
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

# Classic BPF opcodes and Linux ancillary offsets (linux/filter.h).
BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_ALU_MOD_K = 0x94
BPF_JMP_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_RANDOM = 56
BPF_MAXINSNS = 4096  # classic BPF programs the kernel accepts
SAMPLER_LENGTH = 4  # instructions with_sampling() prepends
MAX_EXPRESSION = 8192  # characters
HANDLE_IDLE = 1.0  # seconds a live handle is kept for the next compile


class Instruction(NamedTuple):
    """One struct sock_filter: {u16 code; u8 jt; u8 jf; u32 k}."""

    code: int
    jt: int
    jf: int
    k: int


Program = tuple  # of Instruction


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


@functools.lru_cache(maxsize=1)
def _libpcap():
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise ValidationError("filter", f"libpcap is not installed ({exc}); run scripts/setup") from None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_create.restype = ctypes.c_void_p
    lib.pcap_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    for setter in ("pcap_set_snaplen", "pcap_set_promisc", "pcap_set_buffer_size", "pcap_set_timeout"):
        getattr(lib, setter).argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.pcap_activate.argtypes = [ctypes.c_void_p]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_lib_version.restype = ctypes.c_char_p
    return lib


@functools.lru_cache(maxsize=1)
def libpcap_version() -> str:
    """libpcap's own version line: a different libpcap may compile differently."""
    return _libpcap().pcap_lib_version().decode(errors="replace")


# pcap_compile is not re-entrant in every libpcap; one compile at a time.
_lock = threading.Lock()


def _activate(lib):
    """A live, non-promiscuous handle on "lo" of this thread's namespace, or None."""
    errbuf = ctypes.create_string_buffer(256)
    handle = lib.pcap_create(LIVE_DEVICE, errbuf)
    if not handle:
        return None
    lib.pcap_set_snaplen(handle, SNAPLEN)
    lib.pcap_set_promisc(handle, 0)  # never promiscuous
    lib.pcap_set_buffer_size(handle, LIVE_BUFFER_BYTES)
    lib.pcap_set_timeout(handle, 1)
    if lib.pcap_activate(handle) == 0:
        return handle
    lib.pcap_close(handle)
    return None


def _activate_in_a_namespace_of_its_own(lib):
    """The same, from a helper thread in a private, throwaway namespace with "lo" up.

    libpcap refuses to activate on a device that is down, and a fresh namespace
    (`ip netns exec`) has "lo" down. Only the handle's flags matter for
    compiling, not where its socket lives; unshare() moves just that thread,
    and the namespace goes when the handle is closed.
    """
    found = []

    def helper():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            return
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                request = struct.pack("16sH14x", LIVE_DEVICE, 0)
                flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
                fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", LIVE_DEVICE, flags | IFF_UP))
        except OSError:
            return
        found.append(_activate(lib))

    thread = threading.Thread(target=helper, name="vtap-libpcap-handle")
    thread.start()
    thread.join()
    return found[0] if found else None


class _LiveHandle:
    """One live handle, reused by the compiles that follow each other, closed once idle."""

    def __init__(self):
        self.handle = None
        self.last_used = 0.0
        self.closer = None

    def get(self, lib):
        """The handle (open one if needed), or None when this process may not; call with _lock held."""
        if self.handle is None:
            self.handle = _activate(lib) or _activate_in_a_namespace_of_its_own(lib)
        self.last_used = time.monotonic()
        if self.handle is not None and self.closer is None:
            self._close_later(lib, HANDLE_IDLE)
        return self.handle

    def _close_later(self, lib, delay):
        self.closer = threading.Timer(delay, self._close_if_idle, args=(lib,))
        self.closer.daemon = True  # never keeps a CLI process alive
        self.closer.start()

    def _close_if_idle(self, lib):
        with _lock:
            idle = time.monotonic() - self.last_used
            if idle < HANDLE_IDLE:
                self._close_later(lib, HANDLE_IDLE - idle)
                return
            self.closer = None
            if self.handle is not None:
                lib.pcap_close(self.handle)
                self.handle = None


_live_handle = _LiveHandle()


@functools.lru_cache(maxsize=4096)
def _compile(expression: str, live: bool) -> tuple[Program, bool]:
    """(program, whether it was compiled on a live handle)."""
    lib = _libpcap()
    with _lock:
        handle = _live_handle.get(lib) if live else None
        dead = None if handle else lib.pcap_open_dead(DLT_EN10MB, SNAPLEN)
        try:
            compiled_on = handle or dead
            program = _BpfProgram()
            if lib.pcap_compile(compiled_on, ctypes.byref(program), expression.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
                message = lib.pcap_geterr(compiled_on).decode(errors="replace")
                raise ValidationError("filter", f"{_shown(expression)}: {message}")
            try:
                instructions = tuple(
                    Instruction(i.code, i.jt, i.jf, i.k) for i in program.bf_insns[: program.bf_len]
                )
                return instructions, handle is not None
            finally:
                lib.pcap_freecode(ctypes.byref(program))
        finally:
            if dead:
                lib.pcap_close(dead)


def _shown(expression: str) -> str:
    """The expression as an error message quotes it (long ones cut)."""
    return repr(expression if len(expression) <= 80 else expression[:77] + "...")


def compile_filter(expression: str | None, live: bool | None = None, cache=None) -> Program:
    """Classic BPF for a pcap filter expression; None or "" matches everything.

    live=None uses a live handle when the process may open one (root).
    cache: a filter_cache.FilterCache, asked first and told what was compiled.
    """
    if live is None:
        live = os.geteuid() == 0
    if expression is not None and not isinstance(expression, str):
        raise ValidationError("filter", f"{expression!r} is not a pcap filter expression")
    text = " ".join((expression or "").split())
    if "\0" in text:
        raise ValidationError("filter", "a filter expression cannot contain NUL characters")
    if len(text) > MAX_EXPRESSION:
        # libpcap's optimizer takes minutes on some long expressions; nobody types these.
        raise ValidationError("filter", f"{_shown(text)} is longer than {MAX_EXPRESSION} characters")
    program = cache.get(text, bool(live)) if cache is not None else None
    if program is None:
        program, on_live_handle = _compile(text, bool(live))
        if cache is not None and on_live_handle == bool(live):
            cache.put(text, bool(live), program)
    if any(i.code == BPF_LD_H_ABS and i.k == (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF for i in program):
        # libpcap tests "not PACKET_OUTGOING", a type only packet sockets see: at tc hooks
        # inbound would match everything and outbound nothing.
        raise ValidationError("filter", f"{_shown(text)}: inbound/outbound do not work in the kernel's filters; use the flow's direction (in, out, both)")
    if len(program) > BPF_MAXINSNS - SAMPLER_LENGTH:
        raise ValidationError("filter", f"{_shown(text)} compiles to {len(program)} instructions; the kernel takes at most {BPF_MAXINSNS - SAMPLER_LENGTH} here")
    return program


def check_filter(expression: str | None) -> None:
    """Raise ValidationError when libpcap rejects the expression."""
    compile_filter(expression, live=False)


def with_sampling(program: Program, one_in: int | None) -> Program:
    """The program, passing only 1 in `one_in` of the packets it would pass.

    Prepended, so the relative jumps inside the original stay valid.
    """
    if not one_in or one_in == 1:
        return tuple(program)
    sampler = (
        Instruction(BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_RANDOM) & 0xFFFFFFFF),  # A = random u32
        Instruction(BPF_ALU_MOD_K, 0, 0, one_in),  # A %= N
        Instruction(BPF_JMP_JEQ_K, 1, 0, 0),  # A == 0 ? go on : drop
        Instruction(BPF_RET_K, 0, 0, 0),
    )
    return sampler + tuple(program)
