"""Classic BPF (as vtap_core.filters makes it) -> one eBPF program for the tcx hook.

The program runs the filter, and on a match counts the packet in a per-CPU map
and copies it with bpf_clone_redirect(): filter and mirror in one step, which is
faster for small packets than cls_bpf + mirred. Whatever happens it returns
TCX_NEXT, so the programs after it on the hook (and clsact) still see the packet.

Why not the kernel's own classic-to-eBPF conversion: it uses LD_ABS/LD_IND,
which end the program with 0 when a load falls off the packet; on tcx 0 is
TCX_PASS and would skip everybody else's programs. Here a packet load reads the
skb's linear part directly (__sk_buff data/data_end, bounds checked in the
program: the cheap path), and only bytes past data_end (a non-linear skb) go
through a bpf_skb_load_bytes() call, placed out of line after the program; a
failed load is "no match", as in classic BPF. At the tcx hook data starts at
the MAC header on both ingress (tcx_run() pushes it back, as for cls_bpf) and
egress, so packet offset k is data + k.

Register use: A in r7, X in r8 (callee-saved, so they survive helper calls), the
skb in r6, the packet's start (data) in r9 until a match, then the counters' map
value. Classic scratch memory M[0..15] is on the stack; only the slots the
program reads are zeroed first. All arithmetic is 32-bit as in classic BPF.

Licence: vtap is Apache-2.0, which the kernel does not count as GPL-compatible,
so only helpers not marked gpl_only are used (map lookup, skb_load_bytes,
clone_redirect, get_prandom_u32); the kernel refuses the load otherwise.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

from vtap_drivers.linux import bpfsys

TCX_NEXT = -1
BPF_F_INGRESS = 1
COUNTERS = ("packets", "bytes", "clone_failures")  # u64 each, one map entry (key 0)
NAME_PREFIX = "vtap_"
IDENTIFIER = re.compile(r"[A-Za-z0-9_]{1,10}")  # 15 characters for a kernel object name, less the prefix

# eBPF helpers (enum bpf_func_id); none of them gpl_only.
MAP_LOOKUP_ELEM, GET_PRANDOM_U32, CLONE_REDIRECT, SKB_LOAD_BYTES = 1, 7, 13, 26
RINGBUF_RESERVE, RINGBUF_SUBMIT, RINGBUF_DISCARD, KTIME_GET_TAI_NS = 131, 132, 133, 208

# struct __sk_buff offsets.
SKB_LEN, SKB_PKT_TYPE, SKB_MARK, SKB_QUEUE_MAPPING, SKB_PROTOCOL = 0, 4, 8, 12, 16
SKB_VLAN_PRESENT, SKB_VLAN_TCI, SKB_VLAN_PROTO, SKB_IFINDEX = 20, 24, 28, 40
SKB_DATA, SKB_DATA_END = 76, 80
MAX_PACKET_OFF = 0xFFFF  # the verifier's limit on a packet pointer's offset: beyond it only the helper reads

R0, R1, R2, R3, R4 = 0, 1, 2, 3, 4
CTX, A, X, COUNTER_VALUE, FP = 6, 7, 8, 9, 10
DATA = COUNTER_VALUE  # the packet's start until a match; the map value after
SCRATCH_SLOTS = 16  # classic M[0..15], u32 each, at FP-4 .. FP-64
LOAD_BUFFER = -72  # where packet bytes land
MAP_KEY = -80

# Classic BPF fields (linux/filter.h).
C_LD, C_LDX, C_ST, C_STX, C_ALU, C_JMP, C_RET, C_MISC = range(8)
SIZE_BYTES = {0x00: 4, 0x08: 2, 0x10: 1}
M_IMM, M_ABS, M_IND, M_MEM, M_LEN, M_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
SRC_X = 0x08
ALU_DIV, ALU_MOD, ALU_LSH, ALU_RSH, ALU_NEG = 0x30, 0x90, 0x60, 0x70, 0x80
ALU_OPS = {0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0}
JMP_JA = 0x00
JMP_CONDITIONS = {0x10, 0x20, 0x30, 0x40}  # JEQ JGT JGE JSET: eBPF uses the same op bits
RET_K, RET_A = 0x00, 0x10
MISC_TAX, MISC_TXA = 0x00, 0x80

# Linux ancillary loads (SKF_AD_OFF + n) -> how to get the same value from __sk_buff.
SKF_AD_OFF = -0x1000
ANCILLARY = {
    0: ("protocol", SKB_PROTOCOL, 16),  # classic gives it in host order; __sk_buff in network order
    4: ("pkttype", SKB_PKT_TYPE, 0),
    8: ("ifindex", SKB_IFINDEX, 0),
    20: ("mark", SKB_MARK, 0),
    24: ("queue", SKB_QUEUE_MAPPING, 0),
    44: ("vlan_tci", SKB_VLAN_TCI, 0),
    48: ("vlan_tag_present", SKB_VLAN_PRESENT, 0),
    60: ("vlan_tpid", SKB_VLAN_PROTO, 16),
}
SKF_AD_RANDOM = 56

# eBPF opcodes used here.
ALU32_K, ALU32_X, ALU64_K, ALU64_X = 0x04, 0x0C, 0x07, 0x0F
MOV32_K, MOV32_X, MOV64_K, MOV64_X = 0xB4, 0xBC, 0xB7, 0xBF
ADD = 0x00
TO_BE = 0xDC
LDX_W, LDX_H, LDX_B, LDX_DW = 0x61, 0x69, 0x71, 0x79
STX_W, STX_DW, ST_W = 0x63, 0x7B, 0x62
LD_IMM64, PSEUDO_MAP_FD = 0x18, 1
JA, JEQ_K, JNE_K, JGE_K, JGT_K, JGT_X = 0x05, 0x15, 0x55, 0x35, 0x25, 0x2D
JLT_K, JLE_K = 0xA5, 0xB5
ALU64_OR_K, ALU64_LSH_K = 0x47, 0x67
JMP32_K, JMP32_X, JNE32_K, JEQ32_K = 0x06, 0x0E, 0x56, 0x16
CALL, EXIT = 0x85, 0x95
LDX_BY_SIZE = {4: LDX_W, 2: LDX_H, 1: LDX_B}


class RingAction(NamedTuple):
    """On a match, write the frame into a BPF ring buffer (bpfring.py) instead of cloning it.

    map_fd: the ring; snaplen: at most this many bytes of the frame; direction:
    pcapng epb_flags' 1 (inbound: an ingress hook) or 2 (outbound)."""

    map_fd: int
    snaplen: int | None
    direction: int


RING_SMALLEST = 64  # the smallest record's room for frame bytes; then powers of two up to the snaplen
RING_LARGEST = 262144


def ring_size_classes(snaplen: int | None) -> list[int]:
    """The frame room of each record size the program reserves (bpf_ringbuf_reserve takes a constant)."""
    largest = min(snaplen or RING_LARGEST, RING_LARGEST)
    classes, size = [], RING_SMALLEST
    while size < largest:
        classes.append(size)
        size *= 2
    return classes + [largest]


class Untranslatable(ValueError):
    """The classic program uses something this translator does not do: use cls_bpf instead."""


class _Asm:
    """Instructions with symbolic jump targets, resolved once everything is emitted."""

    def __init__(self):
        self.items = []  # (code, dst, src, off_or_label, imm) or ("label", name)
        self.size = 0
        self.out_of_line = []  # functions that emit blocks after the main program (slow paths)

    def __call__(self, code, dst=0, src=0, off=0, imm=0):
        self.items.append((code, dst, src, off, imm))
        self.size += 2 if code == LD_IMM64 else 1

    def label(self, name):
        self.items.append(("label", name, self.size))

    def assemble(self) -> bytes:
        labels = {item[1]: item[2] for item in self.items if item[0] == "label"}
        out, position = [], 0
        for item in self.items:
            if item[0] == "label":
                continue
            code, dst, src, off, imm = item
            if not isinstance(off, int):
                off = labels[off] - (position + 1)
                if not -32768 <= off <= 32767:
                    raise Untranslatable("the translated program is too long for eBPF jumps")
            out.append(struct.pack("<BBhi", code, dst | (src << 4), off, _s32(imm)))
            position += 1
            if code == LD_IMM64:
                out.append(struct.pack("<BBhi", 0, 0, 0, 0))
                position += 1
        return b"".join(out)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def translate(program, counters_map_fd: int, target_ifindex: int, to_ingress: bool = False, ring: RingAction | None = None) -> bytes:
    """eBPF instructions for the classic program (a sequence of (code, jt, jf, k)).

    On a match: count in the map, clone to target_ifindex (its egress, or its
    ingress with to_ingress); with `ring`, write the frame into that ring buffer
    instead (target_ifindex is then unused). Always TCX_NEXT. Untranslatable
    when the program uses an opcode or ancillary load not handled here.
    """
    program = [tuple(insn) for insn in program]
    if not program:
        raise Untranslatable("an empty classic program")
    if program[-1][0] & 0x07 != C_RET:
        raise Untranslatable("a classic program must end with a return")  # else it would run into "match"
    asm = _Asm()
    asm(MOV64_X, CTX, R1)
    asm(MOV32_K, A, imm=0)
    asm(MOV32_K, X, imm=0)
    if any(_reads_packet(code) for code, *_ in program):
        asm(LDX_W, DATA, CTX, SKB_DATA)
    read_slots = {k for code, _, _, k in program if code & 0x07 in (C_LD, C_LDX) and code & 0xE0 == M_MEM}
    for slot in sorted(read_slots):  # the verifier wants stack written before it is read
        if 0 <= slot < SCRATCH_SLOTS:
            asm(ST_W, FP, off=_scratch(slot), imm=0)
    for index, insn in enumerate(program):
        asm.label(("c", index))
        _classic(asm, index, insn, len(program))
    if ring is None:
        _on_match(asm, counters_map_fd, target_ifindex, BPF_F_INGRESS if to_ingress else 0)
    else:
        _on_match_ring(asm, counters_map_fd, ring)
    for emit in asm.out_of_line:
        emit()
    return asm.assemble()


def _reads_packet(code: int) -> bool:
    kind, mode = code & 0x07, code & 0xE0
    return (kind == C_LD and mode in (M_ABS, M_IND)) or (kind == C_LDX and mode == M_MSH)


def _scratch(slot: int) -> int:
    return -4 * (slot + 1)


def _target(index: int, skip: int, length: int):
    destination = index + 1 + skip
    if destination >= length:
        raise Untranslatable(f"instruction {index} jumps past the end of the program")
    return ("c", destination)


def _classic(asm: _Asm, index: int, insn: tuple, length: int) -> None:
    code, jt, jf, k = insn
    kind = code & 0x07
    if kind in (C_LD, C_LDX):
        _load(asm, code, k, A if kind == C_LD else X)
    elif kind == C_ST:
        _check_slot(k)
        asm(STX_W, FP, A, _scratch(k))
    elif kind == C_STX:
        _check_slot(k)
        asm(STX_W, FP, X, _scratch(k))
    elif kind == C_ALU:
        _alu(asm, code, k)
    elif kind == C_JMP:
        op = code & 0xF0
        if op == JMP_JA:
            asm(JA, off=_target(index, k, length))
            return
        if op not in JMP_CONDITIONS:
            raise Untranslatable(f"classic jump opcode {code:#x}")
        if code & SRC_X:
            asm(JMP32_X | op, A, X, _target(index, jt, length))
        else:
            asm(JMP32_K | op, A, 0, _target(index, jt, length), k)
        if jf:
            asm(JA, off=_target(index, jf, length))
    elif kind == C_RET:
        source = code & 0x18
        if source == RET_K:
            asm(JA, off="match" if k else "nomatch")
        elif source == RET_A:
            asm(JNE32_K, A, off="match", imm=0)
            asm(JA, off="nomatch")
        else:
            raise Untranslatable(f"classic return opcode {code:#x}")
    elif code == C_MISC | MISC_TAX:
        asm(MOV32_X, X, A)
    elif code == C_MISC | MISC_TXA:
        asm(MOV32_X, A, X)
    else:
        raise Untranslatable(f"classic opcode {code:#x}")


def _check_slot(k: int) -> None:
    if not 0 <= k < SCRATCH_SLOTS:
        raise Untranslatable(f"scratch memory slot {k}")


def _load(asm: _Asm, code: int, k: int, register: int) -> None:
    mode, size = code & 0xE0, code & 0x18
    if mode == M_IMM:
        asm(MOV32_K, register, imm=k)
    elif mode == M_MEM:
        _check_slot(k)
        asm(LDX_W, register, FP, _scratch(k))
    elif mode == M_LEN:
        asm(LDX_W, register, CTX, SKB_LEN)
    elif register == A and mode == M_ABS and k >= 0x80000000:
        _ancillary(asm, k)
    elif register == A and mode in (M_ABS, M_IND) and size in SIZE_BYTES:
        _packet_load(asm, A, k, SIZE_BYTES[size], indexed=mode == M_IND)
    elif register == X and mode == M_MSH and size == 0x10:
        _packet_load(asm, X, k, 1, indexed=False)
        asm(ALU32_K | 0x50, X, imm=0x0F)  # X = (P[k] & 0xf) << 2: an IPv4 header's length
        asm(ALU32_K | ALU_LSH, X, imm=2)
    else:
        raise Untranslatable(f"classic load opcode {code:#x} (k={k:#x})")


def _packet_load(asm: _Asm, register: int, k: int, size: int, indexed: bool) -> None:
    """register = `size` bytes of the packet at k (or X + k), in host order; "no match" if out of the packet.

    Straight from the linear part when the bytes are in it; else the helper,
    out of line. The offset is a u32 as in classic BPF (X + k wraps).
    """
    if k >= 0x80000000:  # SKF_NET_OFF / SKF_LL_OFF relative loads; libpcap never emits them
        raise Untranslatable(f"classic packet load at {_s32(k):#x}")
    slow, resume = ("slow", asm.size), ("resume", asm.size)
    if indexed:
        asm(MOV32_X, R2, X)
        asm(ALU32_K | ADD, R2, imm=k)
        # The verifier only adds a bounded scalar to a packet pointer.
        asm(JGT_K, R2, off=slow, imm=MAX_PACKET_OFF - size)
        asm(MOV64_X, R1, DATA)
        asm(ALU64_X | ADD, R1, R2)
        asm(MOV64_X, R3, R1)
        asm(ALU64_K | ADD, R3, imm=size)
        asm(LDX_W, R4, CTX, SKB_DATA_END)
        asm(JGT_X, R3, R4, off=slow)
        asm(LDX_BY_SIZE[size], register, R1, 0)
    elif k + size <= MAX_PACKET_OFF:
        asm(MOV64_X, R1, DATA)
        asm(ALU64_K | ADD, R1, imm=k + size)
        asm(LDX_W, R4, CTX, SKB_DATA_END)
        asm(JGT_X, R1, R4, off=slow)
        if k <= 0x7FFF:
            asm(LDX_BY_SIZE[size], register, DATA, k)
        else:
            asm(ALU64_K | ADD, R1, imm=-size)
            asm(LDX_BY_SIZE[size], register, R1, 0)
    else:
        asm(JA, off=slow)
    asm.label(resume)
    if size > 1:
        asm(TO_BE, register, imm=size * 8)  # packet bytes are big-endian; classic A is a number

    def emit_slow_path():  # bytes past data_end (or past what the verifier allows): the helper
        asm.label(slow)
        if indexed:
            asm(MOV32_X, R2, X)
            asm(ALU32_K | ADD, R2, imm=k)
        else:
            asm(MOV32_K, R2, imm=k)
        asm(MOV64_X, R1, CTX)
        asm(MOV64_X, R3, FP)
        asm(ALU64_K | ADD, R3, imm=LOAD_BUFFER)
        asm(MOV64_K, R4, imm=size)
        asm(CALL, imm=SKB_LOAD_BYTES)
        asm(JNE_K, R0, off="nomatch", imm=0)
        asm(LDX_BY_SIZE[size], register, FP, LOAD_BUFFER)
        asm(JA, off=resume)

    asm.out_of_line.append(emit_slow_path)


def _ancillary(asm: _Asm, k: int) -> None:
    offset = _s32(k) - SKF_AD_OFF
    if offset == SKF_AD_RANDOM:
        asm(CALL, imm=GET_PRANDOM_U32)
        asm(MOV32_X, A, R0)
        return
    if offset not in ANCILLARY or _s32(k) < SKF_AD_OFF:
        raise Untranslatable(f"classic ancillary load {_s32(k):#x}")
    _, field, swap_bits = ANCILLARY[offset]
    asm(LDX_W, A, CTX, field)
    if swap_bits:
        asm(TO_BE, A, imm=swap_bits)


def _alu(asm: _Asm, code: int, k: int) -> None:
    op = code & 0xF0
    if op not in ALU_OPS:
        raise Untranslatable(f"classic ALU opcode {code:#x}")
    if op == ALU_NEG:
        asm(ALU32_K | ALU_NEG, A)
        return
    if code & SRC_X:
        if op in (ALU_DIV, ALU_MOD):
            asm(JEQ_K, X, off="nomatch", imm=0)  # classic BPF: division by zero ends the program with 0
        if op in (ALU_LSH, ALU_RSH):
            # libpcap: a shift by 32 or more gives 0 (eBPF would mask the count).
            too_far, done = ("shift_too_far", asm.size), ("shift_done", asm.size)
            asm(JGE_K, X, off=too_far, imm=32)
            asm(ALU32_X | op, A, X)
            asm(JA, off=done)
            asm.label(too_far)
            asm(MOV32_K, A, imm=0)
            asm.label(done)
            return
        asm(ALU32_X | op, A, X)
        return
    if op in (ALU_DIV, ALU_MOD) and k == 0:
        raise Untranslatable("classic division by the constant 0")
    if op in (ALU_LSH, ALU_RSH) and k >= 32:
        raise Untranslatable(f"classic shift by {k}")
    asm(ALU32_K | op, A, imm=k)


def _counters_entry(asm: _Asm, map_fd: int) -> None:
    """COUNTER_VALUE = the counters map's one entry (NULL if the lookup failed: then nothing is counted)."""
    asm(ST_W, FP, off=MAP_KEY, imm=0)
    asm(LD_IMM64, R1, PSEUDO_MAP_FD, imm=map_fd)
    asm(MOV64_X, R2, FP)
    asm(ALU64_K | ADD, R2, imm=MAP_KEY)
    asm(CALL, imm=MAP_LOOKUP_ELEM)
    asm(MOV64_X, COUNTER_VALUE, R0)


def _count_packet(asm: _Asm) -> None:
    """packets += 1, bytes += skb->len (COUNTER_VALUE is not NULL here)."""
    asm(LDX_DW, R1, COUNTER_VALUE, 0)
    asm(ALU64_K | ADD, R1, imm=1)
    asm(STX_DW, COUNTER_VALUE, R1, 0)
    asm(LDX_W, R2, CTX, SKB_LEN)
    asm(LDX_DW, R1, COUNTER_VALUE, 8)
    asm(ALU64_X | ADD, R1, R2)
    asm(STX_DW, COUNTER_VALUE, R1, 8)


def _count_failure_and_leave(asm: _Asm) -> None:
    """The third counter += 1 (a clone or ring write that failed), then "nomatch": TCX_NEXT."""
    asm(JEQ_K, COUNTER_VALUE, off="nomatch", imm=0)
    asm(LDX_DW, R1, COUNTER_VALUE, 16)
    asm(ALU64_K | ADD, R1, imm=1)
    asm(STX_DW, COUNTER_VALUE, R1, 16)
    asm.label("nomatch")  # also the way out after a match
    asm(MOV64_K, R0, imm=TCX_NEXT)
    asm(EXIT)


def _on_match(asm: _Asm, map_fd: int, ifindex: int, flags: int) -> None:
    """Count the packet (packets, bytes), clone it, count a failed clone; then TCX_NEXT."""
    asm.label("match")
    _counters_entry(asm, map_fd)
    asm(JEQ_K, COUNTER_VALUE, off="clone", imm=0)
    _count_packet(asm)
    asm.label("clone")
    asm(MOV64_X, R1, CTX)
    asm(MOV32_K, R2, imm=ifindex)
    asm(MOV64_K, R3, imm=flags)
    asm(CALL, imm=CLONE_REDIRECT)
    asm(JEQ_K, R0, off="nomatch", imm=0)
    _count_failure_and_leave(asm)


RECORD_HEAD = 32  # bpfring.RECORD_HEAD: time, length, captured, ifindex, vlan tci, vlan proto, flags
RECORD, CAPTURED = A, X  # after a match the classic registers are free: the record, its captured length


def _on_match_ring(asm: _Asm, map_fd: int, ring: RingAction) -> None:
    """Reserve a record of the smallest size class that holds the captured bytes, fill it (header, then
    bpf_skb_load_bytes), submit it and count the packet; a reserve that fails (ring full) or a load that
    fails counts in the third counter. Then TCX_NEXT.

    Submitted with flags 0: the kernel's adaptive wakeup notifies the reader only when it had consumed
    everything before this record, so a reader that is behind costs no irq_work per frame."""
    classes = ring_size_classes(ring.snaplen)
    asm.label("match")
    _counters_entry(asm, map_fd)
    asm(LDX_W, CAPTURED, CTX, SKB_LEN)
    asm(JLE_K, CAPTURED, off="ring_sized", imm=classes[-1])
    asm(MOV64_K, CAPTURED, imm=classes[-1])
    asm.label("ring_sized")
    asm(JLT_K, CAPTURED, off="nomatch", imm=1)  # an empty skb has nothing to write (and the verifier wants a size > 0)
    for size in classes[:-1]:
        asm(JLE_K, CAPTURED, off=("ring_class", size), imm=size)
    for size in reversed(classes):  # the largest first: the chain above falls through to it
        asm.label(("ring_class", size))
        asm(LD_IMM64, R1, PSEUDO_MAP_FD, imm=ring.map_fd)
        asm(MOV64_K, R2, imm=RECORD_HEAD + size)
        asm(MOV64_K, R3, imm=0)
        asm(CALL, imm=RINGBUF_RESERVE)
        asm(JEQ_K, R0, off="ring_full", imm=0)
        asm(MOV64_X, RECORD, R0)
        asm(JA, off="ring_fill")
    asm.label("ring_fill")
    asm(CALL, imm=KTIME_GET_TAI_NS)
    asm(STX_DW, RECORD, R0, 0)
    asm(LDX_W, R1, CTX, SKB_LEN)
    asm(STX_W, RECORD, R1, 8)
    asm(STX_W, RECORD, CAPTURED, 12)
    for field, offset in ((SKB_IFINDEX, 16), (SKB_VLAN_TCI, 20), (SKB_VLAN_PROTO, 24)):
        asm(LDX_W, R1, CTX, field)
        asm(STX_W, RECORD, R1, offset)
    asm(LDX_W, R1, CTX, SKB_VLAN_PRESENT)
    asm(ALU64_LSH_K, R1, imm=4)
    asm(ALU64_OR_K, R1, imm=ring.direction)
    asm(STX_W, RECORD, R1, 28)
    asm(MOV64_X, R1, CTX)
    asm(MOV64_K, R2, imm=0)
    asm(MOV64_X, R3, RECORD)
    asm(ALU64_K | ADD, R3, imm=RECORD_HEAD)
    asm(MOV64_X, R4, CAPTURED)
    asm(CALL, imm=SKB_LOAD_BYTES)
    asm(JNE_K, R0, off="ring_discard", imm=0)
    asm(MOV64_X, R1, RECORD)
    asm(MOV64_K, R2, imm=0)
    asm(CALL, imm=RINGBUF_SUBMIT)
    asm(JEQ_K, COUNTER_VALUE, off="nomatch", imm=0)
    _count_packet(asm)
    asm(JA, off="nomatch")
    asm.label("ring_discard")
    asm(MOV64_X, R1, RECORD)
    asm(MOV64_K, R2, imm=0)
    asm(CALL, imm=RINGBUF_DISCARD)
    asm.label("ring_full")
    _count_failure_and_leave(asm)


def program_name(identifier: str) -> str:
    """vtap_<identifier>: how vtap recognises its own programs on a hook (BPF_PROG_QUERY + info)."""
    if not IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"program identifier {identifier!r}: 1-10 letters, digits or '_'")
    return NAME_PREFIX + identifier


class MirrorProgram(NamedTuple):
    """A loaded mirror program and its counters map; closing both lets the kernel free them."""

    prog: bpfsys.BpfFd
    counters: bpfsys.BpfFd

    def read_counters(self) -> dict:
        return read_counters(self.counters)

    def close(self) -> None:
        self.prog.close()
        self.counters.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_mirror(program, target_ifindex: int, identifier: str, to_ingress: bool = False, ring: RingAction | None = None) -> MirrorProgram:
    """Translate and load: the program (named vtap_<identifier>) and its own counters map."""
    name = program_name(identifier)
    counters = bpfsys.create_percpu_array(name, 8 * len(COUNTERS))
    try:
        code = translate(program, counters.fileno(), target_ifindex, to_ingress, ring)
        prog = bpfsys.load_program(code, name)
    except BaseException:
        counters.close()
        raise
    return MirrorProgram(prog, counters)


def read_counters(counters: bpfsys.BpfFd) -> dict:
    """{"packets", "bytes", "clone_failures"} summed over CPUs."""
    return dict(zip(COUNTERS, bpfsys.read_percpu_u64(counters, 0, len(COUNTERS))))
