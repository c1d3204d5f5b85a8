"""Filter expressions and directions on a real kernel: exactly the matching frames reach the target.

Each case sends a mix of frames through src0 (received by it, or sent by it)
with a mirror to port:mon0, and counts on mon1 which of them arrived.
"""

import socket
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from datapaths import on_both_datapaths
from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)
from vtap_core.model import Source, TapFlow, TapSession

SRC_MAC = "02:00:00:00:00:01"
DST_MAC = "02:00:00:00:00:02"
OTHER_MAC = "02:00:00:00:00:09"


def eth(src=SRC_MAC):
    return Ether(src=src, dst=DST_MAC)


def ip4(src="10.1.0.1", dst="10.1.0.2"):
    return IP(src=src, dst=dst)


# (name, expression, [(frame template, should match)])
CASES = [
    ("tcp-port", "tcp port 80", [
        (eth() / ip4() / TCP(sport=1234, dport=80), True),
        (eth() / ip4() / TCP(sport=80, dport=1234), True),
        (eth() / ip4() / TCP(sport=1234, dport=81), False),
        (eth() / ip4() / UDP(sport=1234, dport=80), False),
    ]),
    ("udp-dst-port", "udp and dst port 53", [
        (eth() / ip4() / UDP(sport=5353, dport=53), True),
        (eth() / ip4() / UDP(sport=53, dport=5353), False),
        (eth() / ip4() / TCP(dport=53), False),
    ]),
    ("vlan-any", "vlan", [
        (eth() / Dot1Q(vlan=100) / ip4() / UDP(dport=9), True),
        (eth() / Dot1Q(vlan=200) / ip4() / TCP(dport=22), True),
        (eth() / ip4() / UDP(dport=9), False),
    ]),
    ("vlan-id-and-port", "vlan 100 and tcp port 80", [
        (eth() / Dot1Q(vlan=100) / ip4() / TCP(dport=80), True),
        (eth() / Dot1Q(vlan=100) / ip4() / TCP(dport=81), False),
        (eth() / Dot1Q(vlan=200) / ip4() / TCP(dport=80), False),
        (eth() / ip4() / TCP(dport=80), False),
    ]),
    ("ipv6-tcp", "ip6 and tcp", [
        (eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(dport=443), True),
        (eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(dport=443), False),
        (eth() / ip4() / TCP(dport=443), False),
    ]),
    ("ipv6-host", "ip6 host 2001:db8::7", [
        (eth() / IPv6(src="2001:db8::7", dst="2001:db8::2") / UDP(dport=1), True),
        (eth() / IPv6(src="2001:db8::1", dst="2001:db8::7") / TCP(dport=1), True),
        (eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(dport=1), False),
    ]),
    ("tcp-syn-only", "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0", [
        (eth() / ip4() / TCP(dport=80, flags="S"), True),
        (eth() / ip4() / TCP(dport=80, flags="SA"), False),
        (eth() / ip4() / TCP(dport=80, flags="A"), False),
        (eth() / ip4() / TCP(dport=80, flags="FA"), False),
    ]),
    ("port-range", "tcp portrange 8000-8080", [
        (eth() / ip4() / TCP(sport=40000, dport=8000), True),
        (eth() / ip4() / TCP(sport=40000, dport=8080), True),
        (eth() / ip4() / TCP(sport=40000, dport=8081), False),
        (eth() / ip4() / TCP(sport=40000, dport=7999), False),
    ]),
    ("negation", "not arp and not icmp", [
        (eth() / ARP(psrc="10.1.0.1", pdst="10.1.0.2"), False),
        (eth() / ip4() / ICMP(), False),
        (eth() / ip4() / UDP(dport=7), True),
    ]),
    ("net-and-not-port", "net 10.1.0.0/16 and not port 22", [
        (eth() / ip4("10.1.3.4", "192.0.2.1") / TCP(dport=443), True),
        (eth() / ip4("10.1.3.4", "192.0.2.1") / TCP(dport=22), False),
        (eth() / ip4("10.2.0.1", "192.0.2.1") / TCP(dport=443), False),
    ]),
    ("ether-src", f"ether src {OTHER_MAC}", [
        (eth(OTHER_MAC) / ip4() / UDP(dport=1), True),
        (eth() / ip4() / UDP(dport=1), False),
    ]),
    ("icmp-echo", "icmp[icmptype] == icmp-echo", [
        (eth() / ip4() / ICMP(type=8), True),
        (eth() / ip4() / ICMP(type=0), False),
    ]),
    ("no-filter", None, [
        (eth() / ip4() / UDP(dport=1), True),
        (eth() / ARP(), True),
        (eth() / Dot1Q(vlan=5) / IPv6() / TCP(), True),
    ]),
]


def with_marker(template, marker: bytes, index: int) -> bytes:
    frame = bytes(template / (marker + bytes([index]) + b"\0" * 40))
    return frame


def run_case(lab, direction, expression, frames, hook_of_sender):
    """Apply one flow, send each frame once through `hook_of_sender`, return indexes that arrived."""
    driver = lab.driver()
    session = TapSession("s", "port:mon0")
    flow = TapFlow("f", "s", Source(interface="src0"), direction, expression)
    driver.apply(driver.plan([session], [flow]))
    marker = new_marker()
    sent = [with_marker(template, marker, i) for i, (template, _) in enumerate(frames)]
    counter = lab.packet_socket("mon1")
    try:
        lab.send(hook_of_sender, sent)
        arrived = receive(counter, marker)
    finally:
        counter.close()
    return sent, arrived


@pytest.mark.parametrize("name, expression, frames", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("hook", ["in", "out"])
@on_both_datapaths
def test_exactly_matching_frames_arrive(lab, name, expression, frames, hook):
    """Frames received by src0 (sent on peer0) with direction in; sent by src0 with direction out."""
    lab.standard()
    sender = "peer0" if hook == "in" else "src0"
    sent, arrived = run_case(lab, hook, expression, frames, sender)
    wanted = sorted(sent[i] for i, (_, match) in enumerate(frames) if match)
    assert sorted(arrived) == wanted, f"{expression!r} on {hook}"


@on_both_datapaths
def test_direction_in_out_both(lab):
    """in = what src0 receives, out = what it sends (tcpdump -Q), both = both, never the other."""
    lab.standard()
    marker = new_marker()
    received_frame = with_marker(eth() / ip4() / UDP(dport=1), marker, 1)
    sent_frame = with_marker(eth() / ip4() / UDP(dport=2), marker, 2)
    driver = lab.driver()
    session = TapSession("s", "port:mon0")
    seen = {}
    for direction in ("in", "out", "both"):
        flow = TapFlow("f", "s", Source(interface="src0"), direction)
        bindings = driver.plan([session], [flow])
        driver.apply(bindings)
        counter = lab.packet_socket("mon1")
        try:
            lab.send("peer0", [received_frame])
            lab.send("src0", [sent_frame])
            seen[direction] = sorted(receive(counter, marker))
        finally:
            counter.close()
        driver.remove(bindings)
    assert seen["in"] == [received_frame]
    assert seen["out"] == [sent_frame]
    assert seen["both"] == sorted([received_frame, sent_frame])


@on_both_datapaths
def test_vlan_tag_in_metadata_on_egress(lab):
    """A tag the kernel keeps as skb metadata (not in the frame) on egress: `vlan 100` still matches.

    A tagged frame arriving at in1 has its tag moved into skb->vlan_tci; the
    bridge floods it out of src0 that way, so src0's egress hook sees an
    untagged frame plus metadata (this kernel has no 8021q devices, which
    would tag the same way).
    """
    lab.standard()
    lab.veth("in0", "in1")
    lab.ip("link", "add", "name", "br0", "type", "bridge")
    for port in ("in1", "src0"):
        lab.ip("link", "set", port, "master", "br0")
    lab.ip("link", "set", "br0", "addrgenmode", "none")
    lab.ip("link", "set", "br0", "up")
    driver = lab.driver()
    session = TapSession("s", "port:mon0")
    flow = TapFlow("f", "s", Source(interface="src0"), "out", "vlan 100 and udp port 4000")
    driver.apply(driver.plan([session], [flow]))
    marker = new_marker()
    tagged = [
        with_marker(eth() / Dot1Q(vlan=100) / ip4() / UDP(dport=4000), marker, 1),
        with_marker(eth() / Dot1Q(vlan=100) / ip4() / UDP(dport=4001), marker, 2),
        with_marker(eth() / Dot1Q(vlan=200) / ip4() / UDP(dport=4000), marker, 3),
    ]
    counter, peer = lab.packet_socket("mon1"), lab.packet_socket("peer0")
    try:
        lab.send("in0", tagged)
        arrived = receive(counter, marker)
        left_src0 = receive(peer, marker)
    finally:
        counter.close()
        peer.close()
    assert sorted(left_src0) == sorted(tagged)  # all really left src0, tags kept
    assert arrived == [tagged[0]]


@on_both_datapaths
def test_two_sessions_on_one_hook_both_get_copies_and_others_filters_still_run(lab):
    """vtap's verdict is "continue": a second vtap filter and someone else's later filter see the packet too."""
    lab.standard()
    lab.veth("mon2", "mon3")
    lab.veth("mon4", "mon5")
    driver = lab.driver()
    sessions = [TapSession("a", "port:mon0"), TapSession("b", "port:mon2")]
    flows = [TapFlow("f", "a", Source(interface="src0"), "in"), TapFlow("f", "b", Source(interface="src0"), "in", "udp")]
    driver.apply(driver.plan(sessions, flows))
    # Someone else's classifier after vtap's, with tc's default verdict (pipe).
    if lab.datapath == "tcx":
        lab.tc("qdisc", "add", "dev", "src0", "clsact")  # theirs: on tcx vtap adds none
    lab.tc("filter", "add", "dev", "src0", "ingress", "pref", "100", "bpf", "bytecode", "1,6 0 0 262144", "action", "mirred", "egress", "mirror", "dev", "mon4")
    marker = new_marker()
    frame = with_marker(eth() / ip4() / UDP(dport=1), marker, 1)
    counters = [lab.packet_socket(device) for device in ("mon1", "mon3", "mon5")]
    try:
        lab.send("peer0", [frame] * 3)
        for counter in counters:
            assert receive(counter, marker) == [frame] * 3
    finally:
        for counter in counters:
            counter.close()


@on_both_datapaths
def test_sampling_one_in_n_happens_in_the_kernel(lab):
    """1-in-10 of 3000 matching frames: binomial mean 300, sd ~16.4; accept +-6 sd."""
    lab.standard()
    driver = lab.driver()
    session = TapSession("s", "port:mon0", sample=10)
    flow = TapFlow("f", "s", Source(interface="src0"), "in", "udp")
    driver.apply(driver.plan([session], [flow]))
    marker = new_marker()
    matching = [with_marker(eth() / ip4() / UDP(dport=9), marker, 0)] * 3000
    others = [with_marker(eth() / ip4() / TCP(dport=9), marker, 1)] * 300  # never copied, sampled or not
    counter = lab.packet_socket("mon1")
    try:
        lab.send("peer0", matching + others)
        arrived = receive(counter, marker)
    finally:
        counter.close()
    assert 300 - 99 <= len(arrived) <= 300 + 99
    assert set(arrived) == {matching[0]}
    (observed,) = driver.observe()
    assert observed.counters.packets == len(arrived)


def test_why_filters_are_compiled_on_a_live_handle(lab):
    """At the ingress hook the tag is already skb metadata: a dead handle's `vlan 100` misses it.

    Both programs are installed with tc itself, side by side, each mirroring to its own port.
    """
    from vtap_core.filters import compile_filter

    lab.standard()
    lab.veth("mon2", "mon3")
    lab.tc("qdisc", "add", "dev", "src0", "clsact")
    for port, live in (("mon0", True), ("mon2", False)):
        program = compile_filter("vlan 100", live=live)
        bytecode = ",".join([str(len(program))] + [f"{i.code} {i.jt} {i.jf} {i.k}" for i in program])
        lab.tc("filter", "add", "dev", "src0", "ingress", "bpf", "bytecode", bytecode, "action", "mirred", "egress", "mirror", "dev", port, "continue")
    marker = new_marker()
    tagged = with_marker(eth() / Dot1Q(vlan=100) / ip4() / UDP(dport=1), marker, 1)
    live_port, dead_port = lab.packet_socket("mon1"), lab.packet_socket("mon3")
    try:
        lab.send("peer0", [tagged])
        assert receive(live_port, marker) == [tagged]
        assert receive(dead_port, marker) == []
    finally:
        live_port.close()
        dead_port.close()


def test_filters_compile_with_vlan_handling_even_where_lo_is_down(netns):
    """libpcap will not activate on a down device; vtap then uses a throwaway namespace, never this one's lo."""
    import sys

    probe = "from vtap_core.filters import compile_filter; print(any(i.k == 0xFFFFF030 for i in compile_filter('vlan 100')))"
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
    assert "state DOWN" in subprocess.run(["ip", "-n", netns, "link", "show", "lo"], capture_output=True, text=True, check=True).stdout


@on_both_datapaths
def test_a_vms_direction_is_the_vms_own_on_its_host_side_device(lab):
    """plan_vm_device: out = sent by the VM = what vnet0 receives; in = received by the VM = what vnet0 sends."""
    from pyroute2 import netns as pr_netns

    from vtap_drivers.linux.dataplane import unique

    vm_ns = f"{lab.netns}-vm"
    pr_netns.create(vm_ns)
    try:
        lab.veth("mon0", "mon1")
        lab.ip("link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", vm_ns)
        lab.ip("link", "set", "vnet0", "addrgenmode", "none")
        lab.ip("link", "set", "vnet0", "up")
        subprocess.run(["ip", "-n", vm_ns, "link", "set", "eth0", "addrgenmode", "none"], check=True)
        subprocess.run(["ip", "-n", vm_ns, "link", "set", "eth0", "up"], check=True)
        dataplane = lab.dataplane()
        session = TapSession("s", "port:mon0")
        marker = new_marker()
        sent_by_vm = with_marker(eth() / ip4() / UDP(dport=1), marker, 1)
        sent_to_vm = with_marker(eth() / ip4() / UDP(dport=2), marker, 2)
        seen = {}
        for direction in ("out", "in"):
            bindings = unique(dataplane.plan_vm_device(session, TapFlow("f", "s", Source(vm="web-1"), direction), "vnet0", vm="6b1c6a6e-0c39-4c36-9a3e-1d8d3b0a4f21"))
            dataplane.apply(bindings)
            counter = lab.packet_socket("mon1")
            try:
                with pr_netns.create_socket(vm_ns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0) as guest:
                    guest.bind(("eth0", 0))
                    guest.send(sent_by_vm)
                lab.send("vnet0", [sent_to_vm])
                seen[direction] = receive(counter, marker)
            finally:
                counter.close()
            dataplane.remove(bindings)
        assert seen == {"out": [sent_by_vm], "in": [sent_to_vm]}
    finally:
        pr_netns.remove(vm_ns)
