"""pcap filter expressions -> classic BPF with libpcap (no root needed, except the live-handle case)."""

import os

import pytest

from vtap_core.errors import ValidationError
from vtap_core.filters import (
    BPF_ALU_MOD_K,
    BPF_LD_W_ABS,
    BPF_RET_K,
    SKF_AD_OFF,
    SKF_AD_RANDOM,
    Instruction,
    check_filter,
    compile_filter,
    with_sampling,
)

SKF_AD_VLAN_TAG_PRESENT = 48
BPF_LD_B_ABS = 0x30


def test_an_expression_compiles_to_classic_bpf_ending_in_returns():
    program = compile_filter("tcp port 80", live=False)
    assert all(isinstance(i, Instruction) for i in program)
    assert program[-1] == Instruction(BPF_RET_K, 0, 0, 0)  # no match
    assert any(i.code == BPF_RET_K and i.k > 0 for i in program)  # match


@pytest.mark.parametrize("empty", [None, "", "   "])
def test_no_expression_matches_everything(empty):
    (only,) = compile_filter(empty, live=False)
    assert only.code == BPF_RET_K and only.k > 0


@pytest.mark.parametrize(
    "expression, words",
    [
        ("tcp port 99999", "illegal port number 99999 > 65535"),
        ("tcpx", "syntax error"),
        ("host", "syntax error"),
        ("vlan and and", "syntax error"),
        ("ether host 01:02", "illegal link layer address"),
        ("net 10.0.0.0/33", "mask length must be <= 32"),
    ],
)
def test_libpcaps_own_message_names_the_filter(expression, words):
    with pytest.raises(ValidationError) as caught:
        check_filter(expression)
    assert caught.value.field == "filter"
    assert words in str(caught.value)
    assert str(caught.value).startswith("filter: ") and "\n" not in str(caught.value)


def test_whitespace_does_not_change_the_program():
    assert compile_filter("tcp   port\t80", live=False) == compile_filter("tcp port 80", live=False)


def test_sampling_is_prepended_so_the_original_jumps_stay_valid():
    program = compile_filter("udp or icmp", live=False)
    sampled = with_sampling(program, 10)
    assert sampled[4:] == program
    load, modulo, test, drop = sampled[:4]
    assert load == Instruction(BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_RANDOM) & 0xFFFFFFFF)
    assert modulo == Instruction(BPF_ALU_MOD_K, 0, 0, 10)
    assert (test.jt, test.jf, test.k) == (1, 0, 0)  # rand % N == 0: skip the drop
    assert drop == Instruction(BPF_RET_K, 0, 0, 0)


@pytest.mark.parametrize("one_in", [None, 1])
def test_no_sampling_leaves_the_program_alone(one_in):
    program = compile_filter("udp", live=False)
    assert with_sampling(program, one_in) == program


def loads_vlan_metadata(program):
    return any(i.code == BPF_LD_B_ABS and i.k == (SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT) & 0xFFFFFFFF for i in program)


def test_a_dead_handle_only_looks_for_tags_inside_the_frame():
    assert not loads_vlan_metadata(compile_filter("vlan 100", live=False))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: libpcap's live handle (where VLAN metadata handling is on)")
def test_a_live_handle_also_looks_at_the_tag_the_kernel_moved_into_metadata():
    program = compile_filter("vlan 100 and tcp port 80", live=True)
    assert loads_vlan_metadata(program)
    assert compile_filter("vlan 100 and tcp port 80") == program  # root: live by default


@pytest.mark.parametrize("expression", ["inbound", "outbound and tcp port 22"])
def test_inbound_and_outbound_are_refused_with_a_hint(expression):
    """libpcap tests for PACKET_OUTGOING, which no packet has at a tc hook."""
    with pytest.raises(ValidationError, match="use the flow's direction"):
        check_filter(expression)


def test_a_program_too_long_for_the_kernel_is_refused_and_the_message_stays_short():
    expression = " and ".join(["vlan"] * 900)  # each level of tags adds a dozen instructions
    with pytest.raises(ValidationError) as caught:
        check_filter(expression)
    assert "the kernel takes at most" in str(caught.value)
    assert len(str(caught.value)) < 200


def test_an_expression_longer_than_8_kib_is_refused_before_libpcap_sees_it():
    with pytest.raises(ValidationError, match="longer than 8192 characters"):
        check_filter(" or ".join(f"host 10.0.{i // 250}.{i % 250}" for i in range(1200)))
