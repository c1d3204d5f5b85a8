"""`vtap capture --listen gre:// | erspan://` terminates real GRE/ERSPAN packets (this kernel needs no gretap for it).

    s0 -------- r0 10.79.0.2/24    [test namespace: `vtap capture` listens on 10.79.0.2]
    x0 -------- x1                 --to port:x0: inner frames re-emitted on x0, counted on x1

Outer packets are built here byte by byte (ERSPAN type III with direction and
hardware id, type II, plain GRE with a key) and sent on s0; tshark reads the
pcapng the CLI wrote.
"""

import os
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

ETH_P_ALL = 0x0003
ADDR = "10.79.0.2"


@pytest.fixture
def wire(netns):
    def ip(*args):
        return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout

    ip("link", "add", "s0", "type", "veth", "peer", "name", "r0")
    ip("link", "add", "x0", "type", "veth", "peer", "name", "x1")
    ip("addr", "add", f"{ADDR}/24", "dev", "r0")
    for dev in ("s0", "r0", "x0", "x1", "lo"):
        if dev != "lo":
            ip("link", "set", dev, "addrgenmode", "none")
        ip("link", "set", dev, "up")
    return netns, ip("-br", "link", "show", "r0").split()[2]


def outer(mac, gre_payload):
    return bytes(Ether(src="02:00:00:00:00:09", dst=mac) / IP(src="10.79.0.1", dst=ADDR, proto=47) / gre_payload)


def erspan3(session, inner, egress=True, hwid=17):
    word3 = (hwid & 0x3F) << 4 | (0x8 if egress else 0)
    return struct.pack("!HHI", 0x1000, 0x22EB, 1) + struct.pack("!HHIHH", 0x2000, session, 4242, 0, word3) + inner


def erspan2(session, inner):
    return struct.pack("!HHI", 0x1000, 0x88BE, 1) + struct.pack("!HHI", 0x1000, session, 0) + inner


def gre(key, inner):
    return struct.pack("!HHI", 0x2000, 0x6558, key) + inner


def run_capture(netns, mac, args, rounds, tmp_path):
    """Run the real CLI in the namespace; send `rounds` (lists of outer frames) until it exits."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "")}
    process = subprocess.Popen(["ip", "netns", "exec", netns, "vtap", "capture", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    from pyroute2 import netns as pr_netns

    sender = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    sender.bind(("s0", 0))
    try:
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            for frame in rounds:
                sender.send(frame)
            time.sleep(0.2)
    finally:
        sender.close()
        if process.poll() is None:
            process.kill()
    out, err = process.communicate()
    return process.returncode, err


def tshark(path, *fields):
    args = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for field in fields:
        args += ["-e", field]
    return [line.split("|") for line in subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()]


def test_erspan_session_filter_interface_direction_sequence_timestamp_and_a_port_for_an_ids(wire, tmp_path):
    netns, mac = wire
    from pyroute2 import netns as pr_netns

    marker = uuid.uuid4().hex.encode()
    inner = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=5, dport=6) / (marker + b"\x05" * 30))
    other = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + b"\x06" * 30))
    ids = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL), flags=0)
    ids.bind(("x1", 0))
    ids.settimeout(0.2)
    path = tmp_path / "t.pcapng"
    rc, err = run_capture(netns, mac, ["--listen", f"erspan://{ADDR}?id=5", "-w", str(path), "--to", "port:x0", "--count", "3"],
                          [outer(mac, erspan3(6, other)), outer(mac, erspan3(5, inner)), outer(mac, erspan2(6, other))], tmp_path)
    assert rc == 0, err
    seen = []
    while True:
        try:
            frame = ids.recv(65535)
        except socket.timeout:
            break
        if marker in frame:
            seen.append(frame)
    ids.close()
    # Only session 5's frames, unchanged, in the file and on the IDS port.
    assert [bytes(p) for p in rdpcap(str(path))] == [inner] * 3
    assert seen == [inner] * 3
    # What the tunnel said: the session on the frame's interface, direction and sequence number in binary fields.
    rows = tshark(path, "frame.protocols", "frame.interface_name", "frame.interface_description", "frame.packet_flags_direction", "frame.packet_id", "frame.comment")
    assert [row[:3] for row in rows] == [["eth:ethertype:ip:udp:data", f"erspan://{ADDR}?id=5", "erspan, type III, session id 5, hardware id 17"]] * 3
    assert [(int(row[3], 0), int(row[4]), row[5]) for row in rows] == [(2, 1, "timestamp 4242")] * 3  # outbound (egress), sequence 1


def test_gre_key_filter_and_type_ii(wire, tmp_path):
    netns, mac = wire
    marker = uuid.uuid4().hex.encode()
    inner = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + b"\x07" * 30))
    path = tmp_path / "g.pcapng"
    rc, err = run_capture(netns, mac, ["--listen", f"gre://{ADDR}?key=7", "-w", str(path), "--count", "2"],
                          [outer(mac, gre(8, inner[:-1] + b"\x08")), outer(mac, gre(7, inner))], tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path))] == [inner] * 2
    assert tshark(path, "frame.interface_description", "frame.comment", "frame.packet_id") == [["gre, key 7", "", ""]] * 2
    path2 = tmp_path / "e.pcapng"
    rc, err = run_capture(netns, mac, ["--listen", f"erspan://{ADDR}", "-w", str(path2), "--count", "1"], [outer(mac, erspan2(1023, inner))], tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path2))] == [inner]
    assert tshark(path2, "frame.interface_description", "frame.packet_id", "frame.packet_flags_direction") == [["erspan, type II, session id 1023", "1", ""]]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--listen", "gre://10.79.0.2:5?key=1", "-w", "/tmp/x.pcapng"], "gre has no port"),
        (["--listen", "erspan://10.79.0.2?id=1024", "-w", "/tmp/x.pcapng"], "listen id"),
        (["--listen", "erspan://10.79.0.2?vni=1", "-w", "/tmp/x.pcapng"], "listen"),
        (["--listen", "gre://10.79.0.2"], "-w FILE.pcapng, --to port:IFNAME"),
        (["--listen", "gre://10.79.0.2", "--to", "mon0"], "port:IFNAME"),
        (["--listen", "gre://192.0.2.77", "-w", "/tmp/x.pcapng"], "not an address of this host"),
    ],
)
def test_bad_listen_input_is_one_line_exit_2_and_writes_nothing(wire, tmp_path, args, words):
    netns, _ = wire
    args = [a.replace("/tmp/x.pcapng", str(tmp_path / "x.pcapng")) for a in args]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "")}
    result = subprocess.run(["ip", "netns", "exec", netns, "vtap", "capture", *args], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not (tmp_path / "x.pcapng").exists()


def packets_in(path):
    """Enhanced Packet Blocks in a pcapng file, counted block by block (scapy is slow for 40k frames)."""
    data, offset, count = path.read_bytes(), 0, 0
    while offset + 8 <= len(data):
        kind, length = struct.unpack_from("<II", data, offset)
        count += kind == 6
        offset += length
    return count


def rx_packets(netns, device):
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", device], check=True, capture_output=True, text=True).stdout
    import json

    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def test_a_stalled_terminator_counts_what_the_kernel_dropped_and_keeps_the_rest(wire, tmp_path):
    """SIGSTOP the real CLI while a burst bigger than its ring arrives, then SIGCONT and SIGTERM: every
    packet r0 received is in the file, or in the summary as dropped or left unread (none unaccounted for)."""
    netns, mac = wire
    from pyroute2 import netns as pr_netns

    path = tmp_path / "d.pcapng"
    big = outer(mac, erspan3(5, bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (b"\x09" * 1400))))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "")}
    process = subprocess.Popen(["ip", "netns", "exec", netns, "vtap", "capture", "--listen", f"erspan://{ADDR}", "-w", str(path), "--duration", "30"], stderr=subprocess.PIPE, text=True, env=env)
    sender = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    sender.bind(("s0", 0))
    try:
        deadline = time.monotonic() + 8
        while not (path.exists() and packets_in(path) > 0) and time.monotonic() < deadline:
            sender.send(big)  # until the ring is open and a frame reached the file
            time.sleep(0.2)
        assert path.exists() and packets_in(path) > 0, "the capture never wrote a frame"
        time.sleep(0.5)  # the last probe is in the file too
        before, written_before = rx_packets(netns, "r0"), packets_in(path)
        process.send_signal(19)  # SIGSTOP: the ring (64 MB, ~37k of these) fills up
        for _ in range(60_000):
            sender.send(big)
        process.send_signal(18)  # SIGCONT
        process.terminate()  # at once: what the ring holds is written, or said to be left unread
    finally:
        sender.close()
        if process.poll() is None and process.returncode is None:
            process.send_signal(18)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    received = rx_packets(netns, "r0") - before
    kept = packets_in(path)
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"{kept} frames written to "), err
    dropped = int(summary.split("; ")[1].split()[0])
    unread = int(summary.split("; ")[2].split()[0]) if summary.count("; ") == 2 else 0
    assert dropped > 0 and kept - written_before + unread > 30_000, summary
    assert kept - written_before + dropped + unread == received, (kept, written_before, dropped, unread, received)


def test_sigterm_ends_the_capture_cleanly_with_every_frame_in_the_file(wire, tmp_path):
    netns, mac = wire
    from pyroute2 import netns as pr_netns

    path = tmp_path / "t.pcapng"
    inner = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (b"\x0a" * 40))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "")}
    process = subprocess.Popen(["ip", "netns", "exec", netns, "vtap", "capture", "--listen", f"gre://{ADDR}", "-w", str(path)], stderr=subprocess.PIPE, text=True, env=env)
    sender = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    sender.bind(("s0", 0))
    try:
        deadline = time.monotonic() + 8
        while not (path.exists() and packets_in(path) > 0) and time.monotonic() < deadline:
            sender.send(outer(mac, gre(1, inner)))
            time.sleep(0.2)
        first = packets_in(path)
        for _ in range(100):
            sender.send(outer(mac, gre(2, inner)))
        process.terminate()
        _, err = process.communicate(timeout=20)
    finally:
        sender.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert packets_in(path) == first + 100
    assert err.strip().splitlines()[-1].startswith(f"{first + 100} frames written to {path}"), err


@pytest.mark.parametrize("tunnel", ["erspan", "vxlan"])
def test_fragmented_tunnel_packets_are_joined_before_decapsulation(wire, tmp_path, tunnel):
    """A sender without DF (a kernel vxlan device, by default) fragments outer packets larger than the
    path MTU: the file holds the whole inner frame. Fragments of UDP to another port are not VXLAN."""
    from scapy.layers.inet import fragment

    netns, mac = wire
    marker = uuid.uuid4().hex.encode()
    big = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(range(256)) * 12))
    if tunnel == "erspan":
        packets = [IP(src="10.79.0.1", dst=ADDR, proto=47, id=4242, flags=0) / erspan3(5, big)]
    else:
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8)
        packets = [IP(src="10.79.0.1", dst=ADDR, id=4343, flags=0) / UDP(sport=5000, dport=4790) / (vxlan + big[:-1] + b"\x00"),  # another port
                   IP(src="10.79.0.1", dst=ADDR, id=4242, flags=0) / UDP(sport=5000, dport=4789) / (vxlan + big)]
    pieces = [bytes(Ether(src="02:00:00:00:00:09", dst=mac) / p) for packet in packets for p in fragment(packet, fragsize=1200)[::-1]]
    assert len(pieces) == 3 * len(packets)
    path = tmp_path / "f.pcapng"
    rc, err = run_capture(netns, mac, ["--listen", f"{tunnel}://{ADDR}", "-w", str(path), "--count", "1"], pieces, tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path))] == [big]


def test_the_ring_counts_what_it_holds_unread_and_keeps_only_the_tunnel(wire):
    """The ring's kernel filter: GRE to ADDR is queued; GRE to another address of the host and UDP are not."""
    netns, mac = wire
    from pyroute2 import netns as pr_netns

    from vtap_drivers.linux.terminate import open_tunnel_ring, parse_listen

    subprocess.run(["ip", "-n", netns, "addr", "add", "10.79.0.3/24", "dev", "r0"], check=True)
    inner = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (b"\x0c" * 30))
    ring = open_tunnel_ring(parse_listen(f"gre://{ADDR}"), netns)
    sender = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    sender.bind(("s0", 0))
    try:
        for _ in range(50):
            sender.send(outer(mac, gre(1, inner)))
            sender.send(bytes(Ether(src="02:00:00:00:00:09", dst=mac) / IP(src="10.79.0.1", dst="10.79.0.3", proto=47) / gre(1, inner)))
            sender.send(bytes(Ether(src="02:00:00:00:00:09", dst=mac) / IP(src="10.79.0.1", dst=ADDR) / UDP(dport=4789) / inner))
        time.sleep(0.5)  # partly filled blocks are handed over after RETIRE_MS
        assert ring.unread() == 50
    finally:
        sender.close()
        ring.close()


@pytest.mark.parametrize("tunnel", ["erspan", "vxlan"])
def test_fragmented_ipv6_tunnel_packets_are_joined_before_decapsulation(wire, tmp_path, tunnel):
    """Over IPv6 the sender fragments (Fragment extension header): the file holds the whole inner frame,
    byte for byte, after a small one that came whole. Fragments of UDP to another port are not VXLAN."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6

    netns, mac = wire
    subprocess.run(["ip", "-n", netns, "addr", "add", "fd00:79::2/64", "dev", "r0", "nodad"], check=True)
    marker = uuid.uuid4().hex.encode()
    big = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(range(256)) * 12))
    small = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + b"\x0d" * 30))
    outer6 = IPv6(src="fd00:79::1", dst="fd00:79::2")
    if tunnel == "erspan":
        whole = outer6 / Raw(erspan3(5, small))
        whole.nh = 47
        packets = [outer6 / IPv6ExtHdrFragment(id=4242, nh=47) / Raw(erspan3(5, big))]
    else:
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8)
        whole = outer6 / UDP(sport=5000, dport=4789) / (vxlan + small)
        packets = [outer6 / IPv6ExtHdrFragment(id=4343) / UDP(sport=5000, dport=4790) / (vxlan + big[:-1] + b"\x00"),  # another port
                   outer6 / IPv6ExtHdrFragment(id=4242) / UDP(sport=5000, dport=4789) / (vxlan + big)]
    pieces = [bytes(Ether(src="02:00:00:00:00:09", dst=mac) / p) for packet in packets for p in fragment6(packet, 1280)[::-1]]
    assert len(pieces) == 3 * len(packets) and all(piece[14 + 6] == 44 for piece in pieces)  # each a fragment
    path = tmp_path / "f6.pcapng"
    first = bytes(Ether(src="02:00:00:00:00:09", dst=mac) / whole)
    rc, err = run_capture(netns, mac, ["--listen", f"{tunnel}://[fd00:79::2]", "-w", str(path), "--count", "2"], [first, *pieces], tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path))] == [small, big]


def assert_the_ring_keeps(netns, mac, listen, kept, dropped):
    """Ten rounds of kept + dropped IP packets sent on s0: the listen URL's ring holds the kept ones only."""
    from pyroute2 import netns as pr_netns

    from vtap_drivers.linux.terminate import open_tunnel_ring, parse_listen

    ring = open_tunnel_ring(parse_listen(listen), netns)
    sender = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    sender.bind(("s0", 0))
    try:
        for _ in range(10):
            for packet in kept + dropped:
                sender.send(bytes(Ether(src="02:00:00:00:00:09", dst=mac) / packet))
        time.sleep(0.5)  # partly filled blocks are handed over after RETIRE_MS
        assert ring.unread() == 10 * len(kept)
    finally:
        sender.close()
        ring.close()


def test_the_ipv6_ring_keeps_tunnel_packets_and_tunnel_fragments_only(wire):
    """The ring's kernel filter over IPv6: UDP to the port, and fragments of UDP (their port is checked once
    joined), are queued, also past hop-by-hop, destination options and routing headers; UDP to another port,
    fragments of another protocol, GRE, another address and more extension headers than it walks are not."""
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6

    netns, mac = wire
    for address in ("fd00:79::2", "fd00:79::3"):
        subprocess.run(["ip", "-n", netns, "addr", "add", f"{address}/64", "dev", "r0", "nodad"], check=True)
    to = IPv6(src="fd00:79::1", dst="fd00:79::2")
    vxlan = struct.pack("!B3xI", 0x08, 42 << 8) + bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (b"\x0e" * 30))
    big = vxlan + bytes(2000)
    chain = to / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(options=[]) / IPv6ExtHdrRouting(addresses=[], segleft=0)
    long_option = IPv6ExtHdrDestOpt(autopad=0, options=[Raw(b"\x01\x0c" + bytes(12))])  # 16 bytes: length 1
    kept = [to / UDP(sport=5, dport=4789) / vxlan, *fragment6(to / IPv6ExtHdrFragment(id=9) / UDP(sport=5, dport=4789) / big, 1280),
            chain / UDP(sport=5, dport=4789) / vxlan, to / IPv6ExtHdrHopByHop() / long_option / UDP(sport=5, dport=4789) / vxlan,
            *fragment6(chain / IPv6ExtHdrFragment(id=11) / UDP(sport=5, dport=4789) / big, 1280)]
    dropped = [to / UDP(sport=5, dport=4790) / vxlan,
               IPv6(src="fd00:79::1", dst="fd00:79::3") / UDP(sport=5, dport=4789) / vxlan,
               *fragment6(to / IPv6ExtHdrFragment(id=10) / ICMPv6EchoRequest(data=bytes(2000)), 1280),
               chain / UDP(sport=5, dport=4790) / vxlan,
               *fragment6(chain / IPv6ExtHdrFragment(id=12) / ICMPv6EchoRequest(data=bytes(2000)), 1280),
               chain / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / UDP(sport=5, dport=4789) / vxlan]  # seven: more than it walks
    gre = to / Raw(b"\x00\x00\x65\x58" + vxlan[8:])
    gre.nh = 47
    dropped.append(gre)
    assert len(kept) == 7
    assert_the_ring_keeps(netns, mac, "vxlan://[fd00:79::2]", kept, dropped)


@pytest.mark.parametrize("tunnel", ["erspan", "vxlan"])
def test_ipv6_tunnel_packets_with_extension_headers_are_kept_and_joined(wire, tmp_path, tunnel):
    """Hop-by-hop, destination options and routing headers before the Fragment header (as RFC 8200 orders
    them), or before GRE/UDP itself: the file holds each inner frame, byte for byte."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6

    netns, mac = wire
    subprocess.run(["ip", "-n", netns, "addr", "add", "fd00:79::2/64", "dev", "r0", "nodad"], check=True)
    marker = uuid.uuid4().hex.encode()
    big = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(range(256)) * 12))
    small = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + b"\x0d" * 30))
    chain = IPv6(src="fd00:79::1", dst="fd00:79::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[], segleft=0)
    if tunnel == "erspan":
        whole = IPv6(src="fd00:79::1", dst="fd00:79::2") / IPv6ExtHdrHopByHop(nh=47) / Raw(erspan3(5, small))
        fragmented = chain / IPv6ExtHdrFragment(id=4242, nh=47) / Raw(erspan3(5, big))
    else:
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8)
        whole = IPv6(src="fd00:79::1", dst="fd00:79::2") / IPv6ExtHdrHopByHop() / UDP(sport=5000, dport=4789) / (vxlan + small)
        fragmented = chain / IPv6ExtHdrFragment(id=4242) / UDP(sport=5000, dport=4789) / (vxlan + big)
    pieces = [bytes(Ether(src="02:00:00:00:00:09", dst=mac) / p) for p in fragment6(fragmented, 1280)[::-1]]
    assert len(pieces) == 3 and all(piece[14 + 6] == 0 for piece in pieces)  # each starts with its hop-by-hop header
    path = tmp_path / "x6.pcapng"
    first = bytes(Ether(src="02:00:00:00:00:09", dst=mac) / whole)
    rc, err = run_capture(netns, mac, ["--listen", f"{tunnel}://[fd00:79::2]", "-w", str(path), "--count", "2"], [first, *pieces], tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path))] == [small, big]


def ah(next_header, payload):
    """An IPsec Authentication Header (RFC 4302) of 24 bytes (a 12-byte ICV: its length field says 4) before payload."""
    return struct.pack("!BBHII", next_header, 4, 0, 0x1234, 1) + bytes(range(12)) + payload


def esp(payload):
    """An ESP packet (RFC 4303) as NULL encryption makes it: the payload in clear right after SPI and sequence."""
    return struct.pack("!II", 0x1234, 1) + payload + b"\x01\x02\x02\x2f" + bytes(12)  # padding, its length, next header, ICV


def ip_payload(layer, payload, protocol):
    packet = layer / Raw(payload)
    if packet.version == 4:
        packet.proto = protocol
    else:
        packet.nh = protocol
    return packet


@pytest.mark.parametrize("tunnel", ["erspan", "vxlan"])
def test_ipv6_first_fragments_with_headers_after_the_fragment_header_are_kept_and_joined(wire, tmp_path, tunnel):
    """Headers in the fragmentable part, after the Fragment header (AH, destination options, routing): only the first
    fragment has them; the ring walks it to GRE/UDP, keeps the others as fragments, and the file holds the inner
    frame byte for byte. ERSPAN comes after six headers, RFC 8200's order in full (the most walked)."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6

    netns, mac = wire
    subprocess.run(["ip", "-n", netns, "addr", "add", "fd00:79::2/64", "dev", "r0", "nodad"], check=True)
    marker = uuid.uuid4().hex.encode()
    big = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(range(256)) * 12))
    to = IPv6(src="fd00:79::1", dst="fd00:79::2")
    if tunnel == "erspan":
        after = ah(60, bytes(IPv6ExtHdrDestOpt(nh=47)) + erspan3(5, big))
        fragmented = to / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[], segleft=0) / IPv6ExtHdrFragment(id=4242, nh=51) / Raw(after)
    else:
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8)
        fragmented = to / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=4242) / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[], segleft=0) / UDP(sport=5000, dport=4789) / (vxlan + big)
    pieces = [bytes(Ether(src="02:00:00:00:00:09", dst=mac) / p) for p in fragment6(fragmented, 1280)[::-1]]
    at = 14 + len(fragmented) - len(fragmented[IPv6ExtHdrFragment])  # where the Fragment header is
    assert len(pieces) == 3 and {piece[at] for piece in pieces} == {51 if tunnel == "erspan" else 60}  # the Fragment header says AH / options
    path = tmp_path / "a6.pcapng"
    rc, err = run_capture(netns, mac, ["--listen", f"{tunnel}://[fd00:79::2]", "-w", str(path), "--count", "1"], pieces, tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path))] == [big]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("tunnel", ["erspan", "vxlan"])
def test_tunnel_packets_under_an_authentication_header_are_read_and_esp_is_not(wire, tmp_path, tunnel, version):
    """IPsec AH (IPv4 protocol 51, IPv6 next header 51) before GRE/UDP, on a whole packet and on a fragmented one:
    the file holds each inner frame byte for byte. ESP cannot be read (encrypted): its packets, sent first, even with
    the tunnel packet in clear after the ESP header (NULL encryption), are never taken for the tunnel's."""
    from scapy.layers.inet import fragment
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6

    netns, mac = wire
    marker = uuid.uuid4().hex.encode()
    small = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + b"\x0d" * 30))
    big = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (marker + bytes(range(256)) * 12))
    hidden = small[:-1] + b"\x0e"

    def tunnel_packet(inner):
        if tunnel == "erspan":
            return 47, erspan3(5, inner)
        vxlan = struct.pack("!B3xI", 0x08, 42 << 8) + inner
        return 17, struct.pack("!HHHH", 5000, 4789, 8 + len(vxlan), 0) + vxlan

    if version == 4:
        to, listen = IP(src="10.79.0.1", dst=ADDR), f"{tunnel}://{ADDR}"
        whole = ip_payload(to, ah(*tunnel_packet(small)), 51)
        pieces = fragment(ip_payload(IP(src="10.79.0.1", dst=ADDR, id=4242, flags=0), ah(*tunnel_packet(big)), 51), fragsize=1200)
    else:
        subprocess.run(["ip", "-n", netns, "addr", "add", "fd00:79::2/64", "dev", "r0", "nodad"], check=True)
        to, listen = IPv6(src="fd00:79::1", dst="fd00:79::2"), f"{tunnel}://[fd00:79::2]"
        whole = ip_payload(to, ah(*tunnel_packet(small)), 51)
        pieces = fragment6(to / IPv6ExtHdrFragment(id=4242, nh=51) / Raw(ah(*tunnel_packet(big))), 1280)
    secret = ip_payload(to, esp(tunnel_packet(hidden)[1]), 50)
    frames = [bytes(Ether(src="02:00:00:00:00:09", dst=mac) / p) for p in (secret, whole, *pieces[::-1])]
    assert len(frames) == 5
    path = tmp_path / "ah.pcapng"
    rc, err = run_capture(netns, mac, ["--listen", listen, "-w", str(path), "--count", "2"], frames, tmp_path)
    assert rc == 0, err
    assert [bytes(p) for p in rdpcap(str(path))] == [small, big]


@pytest.mark.parametrize("version", [4, 6])
def test_the_ring_walks_ah_and_the_fragmentable_part_within_its_bound(wire, version):
    """The ring's kernel filter (vxlan://: the port is checked past what it walks): UDP to the port under AH, and
    fragments whose first one reaches UDP past AH or destination options after the Fragment header, are queued;
    fragments past the first are queued as they come (no upper-layer header to check). ESP, UDP to another port
    under AH, two AH (IPv4), more headers than it walks, a chain cut short and the first fragment of something
    else are not."""
    from scapy.layers.inet import ICMP, TCP, fragment
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6

    netns, mac = wire
    vxlan = struct.pack("!B3xI", 0x08, 42 << 8) + bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / (b"\x0e" * 30))

    def udp(port, payload=vxlan):
        return struct.pack("!HHHH", 5, port, 8 + len(payload), 0) + payload

    if version == 4:
        to, listen = IP(src="10.79.0.1", dst=ADDR), f"vxlan://{ADDR}"
        first, *later = fragment(ip_payload(IP(src="10.79.0.1", dst=ADDR, id=9, flags=0), ah(17, udp(4789, vxlan + bytes(2000))), 51), fragsize=1200)
        other_first, *other_later = fragment(ip_payload(IP(src="10.79.0.1", dst=ADDR, id=10, flags=0), ah(1, bytes(ICMP() / bytes(2000))), 51), fragsize=1200)
        kept = [ip_payload(to, ah(17, udp(4789)), 51), first, *later, *other_later]
        dropped = [ip_payload(to, ah(17, udp(4790)), 51), ip_payload(to, esp(udp(4789)), 50), ip_payload(to, ah(51, ah(17, udp(4789))), 51),
                   ip_payload(to, ah(6, bytes(TCP(dport=4789))), 51), ip_payload(to, ah(17, b""), 51), ip_payload(to, b"\x11\x04", 51), other_first]
    else:
        subprocess.run(["ip", "-n", netns, "addr", "add", "fd00:79::2/64", "dev", "r0", "nodad"], check=True)
        to, listen = IPv6(src="fd00:79::1", dst="fd00:79::2"), "vxlan://[fd00:79::2]"
        six = to / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[], segleft=0) / IPv6ExtHdrFragment(id=9, nh=51) / Raw(ah(60, bytes(IPv6ExtHdrDestOpt(nh=17)) + udp(4789, vxlan + bytes(2000))))
        first, *later = fragment6(to / IPv6ExtHdrFragment(id=10) / IPv6ExtHdrDestOpt() / UDP(sport=5, dport=4789) / (vxlan + bytes(2000)), 1280)
        other_first, *other_later = fragment6(to / IPv6ExtHdrFragment(id=11) / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest(data=bytes(2000)), 1280)
        seven = to / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[], segleft=0) / IPv6ExtHdrFragment(id=12, nh=51) / Raw(ah(60, bytes(IPv6ExtHdrDestOpt(nh=60)) + bytes(IPv6ExtHdrDestOpt(nh=17)) + udp(4789, vxlan + bytes(2000))))
        seven_first, *seven_later = fragment6(seven, 1280)
        kept = [ip_payload(to, ah(17, udp(4789)), 51), *fragment6(six, 1280), first, *later, *other_later, *seven_later]
        dropped = [ip_payload(to, ah(17, udp(4790)), 51), ip_payload(to, esp(udp(4789)), 50), seven_first,
                   ip_payload(to, b"\x11\x04", 51), to / IPv6ExtHdrHopByHop(nh=60) / Raw(b"\x11\xff" + bytes(6) + udp(4789)), other_first]
    assert len(kept) == (4 if version == 4 else 7)
    assert_the_ring_keeps(netns, mac, listen, kept, dropped)
