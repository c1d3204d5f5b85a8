"""The agent's log: a line that every status report would repeat (a flow whose VM runs on another
host of the fleet) is written once, not once a second."""

import logging

from vtap_core.agent import OncePerWhile


def lines_through(filter_, messages):
    logger = logging.getLogger("vtap.test.agentlog")
    logger.propagate = False
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(filter_)
    try:
        for message, arg in messages:
            logger.warning(message, arg)
    finally:
        logger.removeFilter(filter_)
        logger.removeHandler(handler)
    return seen


def test_the_same_line_passes_once_and_another_line_still_passes():
    gone = ("not realizable now: session mig flow mig-1: %s", "vm: no VM with UUID or name 'x' at qemu:///system")
    other = ("not realizable now: session web flow web-1: %s", "vm: no VM with UUID or name 'y' at qemu:///system")
    assert lines_through(OncePerWhile(), [gone] * 5 + [other, gone, other]) == [gone[0] % gone[1], other[0] % other[1]]


def test_a_line_is_said_again_after_the_while():
    gone = ("not realizable now: %s", "vm gone")
    assert lines_through(OncePerWhile(every=0.0), [gone] * 3) == ["not realizable now: vm gone"] * 3
