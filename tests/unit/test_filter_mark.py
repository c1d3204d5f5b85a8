"""observe() confirms each vtap filter get with tcnl.filter_has_mark: it must agree with read_filter_mark."""

import pytest

from vtap_drivers.linux import tcnl

MARK = b"vt\x01\x02" + bytes(range(12))
OTHER = b"vt\x01\x02" + bytes(range(1, 13))
ACCEPT_ALL = [(0x06, 0, 0, 0xFFFF)]  # ret #65535


def _filter(cookie=MARK, handle=7, program=ACCEPT_ALL):
    body = tcnl.mirror_filter_request(3, "ingress", 0xC000, program, 9, cookie, handle=handle)
    return bytearray(body)


@pytest.mark.parametrize(
    "reply, mark, expected",
    [
        (_filter(), MARK, True),
        (_filter(), OTHER, False),  # another mark's filter under this handle
        (_filter(cookie=OTHER), MARK, False),
        (_filter(handle=0), MARK, False),  # the per-priority header entry is no filter
        (_filter(cookie=MARK[:8]), MARK, False),  # a shorter cookie is not vtap's
    ],
)
def test_filter_has_mark_agrees_with_the_walk(reply, mark, expected):
    assert tcnl.filter_has_mark(reply, 0, len(reply), mark) is expected
    assert (tcnl.read_filter_mark(reply, 0, len(reply)) == mark) is expected


def test_a_filter_of_another_kind_is_not_vtaps_even_with_its_cookie():
    reply = _filter()
    at = reply.index(b"bpf\0")
    reply[at : at + 4] = b"u32\0"
    assert not tcnl.filter_has_mark(reply, 0, len(reply), MARK)
    assert tcnl.read_filter_mark(reply, 0, len(reply)) is None


def test_the_mark_in_the_program_alone_is_not_a_cookie():
    """Bytes equal to the mark elsewhere (here: the classic BPF program's constants) without the cookie attribute's header."""
    words = [int.from_bytes(MARK[i : i + 4], "little") for i in range(0, 16, 4)]
    program = [(0x06, 0, 0, w) for w in words]
    reply = _filter(cookie=OTHER, program=program)
    assert MARK[:4] in reply
    assert not tcnl.filter_has_mark(reply, 0, len(reply), MARK)
