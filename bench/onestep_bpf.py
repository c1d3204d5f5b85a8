"""The one-step alternative to cls_bpf + mirred, for bench/small_packets.py only (not the product).

One eBPF program does the filter test and bpf_clone_redirect() to the target,
hand-assembled here (no clang needed) and loaded with the bpf() syscall. It is
attached either to the tcx hook (Linux >= 6.6: a BPF link, BPF_LINK_CREATE with
BPF_TCX_INGRESS/EGRESS; detached when its fd closes) or as a cls_bpf filter in
direct-action mode on clsact (no mirred action; pyroute2 netlink).

The filter stands for vtap's "udp port 7": IPv4 or IPv6, UDP, either port 7
(IPv4 without options, IPv6 without extension headers: enough for a frame
that fails at the EtherType test, as every frame of the benchmark does).
"""

from __future__ import annotations

import ctypes
import os
import struct

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD, BPF_LINK_CREATE = 5, 28
BPF_PROG_TYPE_SCHED_CLS = 3
TCX_ATTACH = {"ingress": 46, "egress": 47}  # BPF_TCX_INGRESS, BPF_TCX_EGRESS (linux/bpf.h of 6.6+)
BPF_FUNC_CLONE_REDIRECT = 13
CONTINUE = -1  # TCX_NEXT on tcx, TC_ACT_UNSPEC in cls_bpf: the packet goes on as if nothing happened

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(command: int, attr: bytes) -> int:
    buffer = ctypes.create_string_buffer(attr, 128)
    fd = _libc.syscall(SYS_BPF, command, buffer, 128)
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"bpf({command}): {os.strerror(error)}")
    return fd


# ---------------------------------------------------------------- a tiny assembler

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


MOV_REG, MOV_IMM, AND_IMM = 0xBF, 0xB7, 0x57
LDH_ABS, LDB_ABS = 0x28, 0x30  # r0 = packet half-word / byte at a fixed offset (network order handled); ctx in r6
JEQ_IMM, JNE_IMM, JA = 0x15, 0x55, 0x05
CALL, EXIT = 0x85, 0x95


def _assemble(lines) -> bytes:
    """lines: ("label",) or (code, dst, src, target_label_or_off, imm)."""
    labels, position = {}, 0
    for line in lines:
        if len(line) == 1:
            labels[line[0]] = position
        else:
            position += 1
    out, position = [], 0
    for line in lines:
        if len(line) == 1:
            continue
        code, dst, src, off, imm = line
        if isinstance(off, str):
            off = labels[off] - (position + 1)
        out.append(_insn(code, dst, src, off, imm))
        position += 1
    return b"".join(out)


def program(target_ifindex: int | None, match_udp_port: int | None) -> bytes:
    """Clone every packet (or only UDP to/from match_udp_port) to target_ifindex's egress.

    target_ifindex None: a program that returns at once (what the hook alone costs).
    """
    if target_ifindex is None:
        return _assemble([(MOV_IMM, 0, 0, 0, CONTINUE), (EXIT, 0, 0, 0, 0)])
    clone = [(MOV_REG, 1, 6, 0, 0), (MOV_IMM, 2, 0, 0, target_ifindex), (MOV_IMM, 3, 0, 0, 0), (CALL, 0, 0, 0, BPF_FUNC_CLONE_REDIRECT)]
    lines = [(MOV_REG, 6, 1, 0, 0)]
    if match_udp_port is not None:
        port = match_udp_port
        lines += [
            (LDH_ABS, 0, 0, 0, 12),
            (JEQ_IMM, 0, 0, "ip4", 0x0800),
            (JEQ_IMM, 0, 0, "ip6", 0x86DD),
            (JA, 0, 0, "out", 0),
            ("ip4",),
            (LDB_ABS, 0, 0, 0, 23), (JNE_IMM, 0, 0, "out", 17),
            (LDH_ABS, 0, 0, 0, 20), (AND_IMM, 0, 0, 0, 0x1FFF), (JNE_IMM, 0, 0, "out", 0),
            (LDH_ABS, 0, 0, 0, 34), (JEQ_IMM, 0, 0, "match", port),
            (LDH_ABS, 0, 0, 0, 36), (JEQ_IMM, 0, 0, "match", port),
            (JA, 0, 0, "out", 0),
            ("ip6",),
            (LDB_ABS, 0, 0, 0, 20), (JNE_IMM, 0, 0, "out", 17),
            (LDH_ABS, 0, 0, 0, 54), (JEQ_IMM, 0, 0, "match", port),
            (LDH_ABS, 0, 0, 0, 56), (JEQ_IMM, 0, 0, "match", port),
            (JA, 0, 0, "out", 0),
            ("match",),
        ]
    lines += clone + [("out",), (MOV_IMM, 0, 0, 0, CONTINUE), (EXIT, 0, 0, 0, 0)]
    return _assemble(lines)


def drop_program() -> bytes:
    """Drops every packet (TCX_DROP): on a target's egress, a sink whose receiver costs nothing."""
    return _assemble([(MOV_IMM, 0, 0, 0, 2), (EXIT, 0, 0, 0, 0)])


def load(code: bytes) -> int:
    """A SCHED_CLS program's fd."""
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("=IIQQIIQII16sII", BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns), ctypes.addressof(license), 1, len(log), ctypes.addressof(log), 0, 0, b"vtap_onestep", 0, 0)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror}; verifier: {log.value.decode(errors='replace')[-1500:]}") from None


def attach_tcx(prog_fd: int, ifindex: int, hook: str) -> int:
    """A BPF link on ifindex's tcx hook (in this process's namespace); closing the fd detaches it."""
    return _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, ifindex, TCX_ATTACH[hook], 0))


def attach_cls_bpf_da(ipr, prog_fd: int, ifindex: int, hook: str) -> None:
    """The same program as a direct-action cls_bpf filter on clsact (needs the clsact qdisc)."""
    parent = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}[hook]
    ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog_fd, name="vtap_onestep", parent=parent, prio=1, direct_action=True, protocol=0x0003)
