"""The classic -> eBPF translator without a kernel: what it refuses, and invariants of what it emits."""

import struct

import pytest

from vtap_core import filters
from vtap_drivers.linux import tcxprog
from vtap_drivers.linux.tcxprog import Untranslatable

SKF_AD = 0xFFFFF000  # SKF_AD_OFF as an unsigned k
LD_B_ABS, LD_W_ABS, LD_H_IND, RET_K = 0x30, 0x20, 0x48, 0x06
EBPF_LD_ABS_IND = {0x20, 0x28, 0x30, 0x40, 0x48, 0x50}  # eBPF LD_ABS/LD_IND: a failed load returns 0 = TCX_PASS


def insns(code: bytes):
    """(code, dst, src, off, imm) per 8-byte eBPF instruction."""
    out = []
    for offset in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack_from("<BBhi", code, offset)
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


def translate(program, **kwargs):
    return insns(tcxprog.translate(program, counters_map_fd=3, target_ifindex=7, **kwargs))


@pytest.mark.parametrize("expression", ["tcp port 80", "vlan 10 and ip", "ip[2:2] / ip[8] > 5", "host fe80::1", "len <= 100"])
def test_no_ld_abs_and_every_exit_returns_tcx_next(expression):
    code = translate(filters.with_sampling(filters.compile_filter(expression, live=False), 3))
    assert not {op for op, *_ in code} & EBPF_LD_ABS_IND
    exits = [index for index, (op, *_) in enumerate(code) if op == tcxprog.EXIT]
    assert len(exits) == 1
    assert code[exits[0] - 1] == (tcxprog.MOV64_K, 0, 0, 0, -1)


def test_clone_target_and_flags():
    code = translate(filters.compile_filter("", live=False), to_ingress=True)
    call = code.index((tcxprog.CALL, 0, 0, 0, tcxprog.CLONE_REDIRECT))
    assert (tcxprog.MOV32_K, 2, 0, 0, 7) in code[call - 3:call]
    assert (tcxprog.MOV64_K, 3, 0, 0, tcxprog.BPF_F_INGRESS) in code[call - 3:call]
    assert (tcxprog.LD_IMM64, 1, tcxprog.PSEUDO_MAP_FD, 0, 3) in code  # the counters map


@pytest.mark.parametrize("program, why", [
    ([(LD_W_ABS, 0, 0, SKF_AD + 36), (RET_K, 0, 0, 1)], "ancillary"),  # SKF_AD_CPU
    ([(LD_W_ABS, 0, 0, SKF_AD + 12), (RET_K, 0, 0, 1)], "ancillary"),  # SKF_AD_NLATTR
    ([(LD_B_ABS, 0, 0, 0xFFF00000 + 9), (RET_K, 0, 0, 1)], "ancillary"),  # SKF_NET_OFF + 9
    ([(LD_H_IND, 0, 0, 0xFFF00000), (RET_K, 0, 0, 1)], "packet load"),  # SKF_NET_OFF relative to X
    ([(0xB1, 0, 0, 0xFFF00000), (RET_K, 0, 0, 1)], "packet load"),  # X = 4 * (P[SKF_NET_OFF] & 0xf)
    ([(0x07 | 0x40, 0, 0, 0), (RET_K, 0, 0, 1)], "opcode"),  # an unknown MISC
    ([(0x04 | 0x30, 0, 0, 0), (RET_K, 0, 0, 1)], "division"),  # A /= 0
    ([(0x04 | 0x60, 0, 0, 40), (RET_K, 0, 0, 1)], "shift"),  # A <<= 40
    ([(0x00 | 0x60, 0, 0, 16), (RET_K, 0, 0, 1)], "slot"),  # A = M[16]
    ([(0x15, 5, 0, 1), (RET_K, 0, 0, 1)], "past the end"),
    ([(LD_W_ABS, 0, 0, 0)], "return"),
    ([], "empty"),
])
def test_refuses_what_it_does_not_translate(program, why):
    with pytest.raises(Untranslatable, match=why):
        translate(program)


def test_program_names_carry_the_vtap_prefix():
    assert tcxprog.program_name("s1_f2") == "vtap_s1_f2"
    for bad in ("", "a" * 11, "with-dash", "dot.ted"):
        with pytest.raises(ValueError, match="identifier"):
            tcxprog.program_name(bad)


def _calls(code, helper):
    return [index for index, insn in enumerate(code) if insn == (tcxprog.CALL, 0, 0, 0, helper)]


@pytest.mark.parametrize("expression", ["udp port 7", "tcp port 80", "ip[2:2] / ip[8] > 5", "host fe80::1"])
def test_packet_loads_read_the_linear_part_and_call_the_helper_only_out_of_line(expression):
    code = translate(filters.compile_filter(expression, live=False))
    the_exit = next(index for index, (op, *_) in enumerate(code) if op == tcxprog.EXIT)
    assert (tcxprog.LDX_W, tcxprog.DATA, tcxprog.CTX, tcxprog.SKB_DATA, 0) in code[:the_exit]
    assert (tcxprog.LDX_W, 4, tcxprog.CTX, tcxprog.SKB_DATA_END, 0) in code[:the_exit]
    loads = _calls(code, tcxprog.SKB_LOAD_BYTES)
    assert loads and min(loads) > the_exit  # the fallback sits after the program: no call on the fast path


def test_a_program_without_packet_loads_does_not_read_data():
    code = translate(filters.compile_filter("len <= 100", live=False))
    assert not [insn for insn in code if insn[0] == tcxprog.LDX_W and insn[3] in (tcxprog.SKB_DATA, tcxprog.SKB_DATA_END)]
    assert not _calls(code, tcxprog.SKB_LOAD_BYTES)


def test_only_the_scratch_slots_read_are_zeroed():
    program = [(0x02, 0, 0, 3), (0x60, 0, 0, 5), (0x61, 0, 0, 3), (0x16, 0, 0, 0)]  # M[3] = A; A = M[5]; X = M[3]; ret A
    zeroed = [insn[3] for insn in translate(program) if insn[0] == tcxprog.ST_W and insn[1] == tcxprog.FP]
    assert sorted(zeroed) == sorted([tcxprog._scratch(3), tcxprog._scratch(5), tcxprog.MAP_KEY])
