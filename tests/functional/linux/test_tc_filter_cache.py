"""Compiled programs kept in the state dir: the next process filters exactly as before, and status compiles nothing."""

import subprocess
import sys

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from vtap_core import filters
from vtap_core.model import Source, TapFlow, TapSession

EXPRESSION = "vlan 100 and udp port 4000"


def frames(marker):
    def frame(tag, port, index):
        head = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        if tag:
            head = head / Dot1Q(vlan=tag)
        return bytes(head / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(dport=port) / (marker + bytes([index]) + b"\0" * 40))

    return [frame(100, 4000, 1), frame(100, 4001, 2), frame(200, 4000, 3), frame(None, 4000, 4)]


def test_a_program_from_the_cache_filters_packets_as_a_fresh_compile_does(lab):
    """At ingress the tag is skb metadata: only the live handle's program (the one cached) matches it."""
    lab.standard()
    session = TapSession("s", "port:mon0")
    flow = TapFlow("f", "s", Source(interface="src0"), "in", EXPRESSION)
    first = lab.driver()
    bindings = first.plan([session], [flow])
    first.apply(bindings)
    first.remove(bindings)
    filters._compile.cache_clear()  # as a new process: only the file is left
    second = lab.driver()
    second.apply(second.plan([session], [flow]))
    assert filters._compile.cache_info().misses == 0  # the program came from the state dir
    marker = new_marker()
    sent = frames(marker)
    counter = lab.packet_socket("mon1")
    try:
        lab.send("peer0", sent)
        arrived = receive(counter, marker)
    finally:
        counter.close()
    assert arrived == [sent[0]]
    (observed,) = second.observe()
    assert observed.counters.packets == 1


def test_status_in_a_new_process_compiles_nothing(lab):
    from vtap_core.client import Client

    lab.standard()
    state = f"{lab.state_dir}/state.db"
    with Client(driver="linux", state=state, netns=lab.netns) as vtap:
        vtap.create_session("s", to="port:mon0")
        for port in range(4000, 4010):  # ten distinct expressions
            vtap.add_flow("s", interface="src0", direction="in", filter=f"udp port {port}")
    probe = (
        "from vtap_core import filters; from vtap_core.client import Client\n"
        f"with Client(driver='linux', state={state!r}, netns={lab.netns!r}) as vtap:\n"
        "    rows = vtap.status()\n"
        "print(sorted({r.state for r in rows}), len(rows), filters._compile.cache_info().misses)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "['active'] 10 0"
