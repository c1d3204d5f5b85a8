"""tunnelblock.py on ring blocks laid out as the kernel fills them: the pcapng is byte for byte what the plain
decapsulators (decap_gre / decap_vxlan) and pcapng.py's blocks give (one interface per stream description, the
direction in epb_flags, the sequence number in epb_packetid, the timestamp in a comment), whether the frame took
the fast path (a stream already learnt) or the general one (IP options, a layout not cached, fragments)."""

import struct

from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from vtap_drivers.linux.decap import decap_gre, decap_vxlan
from vtap_drivers.linux.pcapng import enhanced_packet, interface_description
from vtap_drivers.linux.terminate import parse_listen
from vtap_drivers.linux.tunnelblock import BlockReader

FRAME_HEADER = struct.Struct("IIIIIIHH")  # tpacket3_hdr up to tp_net
MAC = 80  # tpacket3_hdr + sockaddr_ll, aligned: where a SOCK_DGRAM packet starts
FIRST = 48
T0 = 1_700_000_000_123_456_789
INNER = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=5, dport=6) / (b"\x05" * 30))


def ring_block(packets, cut=()):
    """One TPACKET_V3 block, handed over to userspace, holding the IP packets (those in `cut`: snaplen short of len)."""
    block, position = bytearray(1 << 16), FIRST
    for number, packet in enumerate(packets):
        step = (MAC + len(packet) + 15) & ~15
        seconds, nanoseconds = divmod(T0 + number * 1001, 1_000_000_000)
        FRAME_HEADER.pack_into(block, position, step, seconds, nanoseconds, len(packet), len(packet) + (number in cut), 1, MAC, MAC)
        block[position + MAC : position + MAC + len(packet)] = packet
        position += step
    struct.pack_into("III", block, 8, 1, len(packets), FIRST)
    return block


class Expected:
    """The pcapng blocks of the frames kept, made from decap_gre / decap_vxlan (numbers: their places in the block);
    an interface's IDB before its first frame, once."""

    def __init__(self, listen_text, vxlan=False, selected=lambda meta: True):
        self.listen_text, self.vxlan, self.selected = listen_text, vxlan, selected
        self.interfaces = {}

    def blocks(self, packets, numbers=None):
        out = b""
        for number, packet in zip(numbers or range(len(packets)), packets):
            header = (40 if packet[0] >> 4 == 6 else (packet[0] & 0x0F) * 4) + (8 if self.vxlan else 0)
            found = (decap_vxlan if self.vxlan else decap_gre)(packet[header:])
            if found is None or not self.selected(found[1]):
                continue
            frame, meta = found
            if meta.description() not in self.interfaces:
                self.interfaces[meta.description()] = len(self.interfaces)
                out += interface_description(if_name=self.listen_text, if_description=meta.description())
            comment = None if meta.timestamp is None else f"timestamp {meta.timestamp}"
            flags = {"ingress": 1, "egress": 2}.get(meta.direction)
            out += enhanced_packet(frame, T0 + number * 1001, interface_id=self.interfaces[meta.description()], comment=comment, flags=flags, packet_id=meta.sequence)
        return out


def before(packets, listen_text, **kwargs):
    return Expected(listen_text, **kwargs).blocks(packets)


def descriptions(blocks):
    """The if_description of each Interface Description Block in blocks."""
    found, position = [], 0
    while position < len(blocks):
        kind, length = struct.unpack_from("<II", blocks, position)
        if kind == 1:
            option = position + 16
            while struct.unpack_from("<H", blocks, option)[0] != 3:
                option += 4 + (struct.unpack_from("<H", blocks, option + 2)[0] + 3) // 4 * 4
            size = struct.unpack_from("<H", blocks, option + 2)[0]
            found.append(bytes(blocks[option + 4 : option + 4 + size]).decode())
        position += length
    return found


class CountingReader(BlockReader):
    """Counts the packets that took the general path (the rest took the fast one)."""

    general = 0

    def _general(self, *args):
        self.general += 1
        return super()._general(*args)


def ipv4(payload, proto=47, options=b"", ident=1):
    return bytes(IP(src="10.79.0.1", dst="10.79.0.2", proto=proto, id=ident, flags="DF", options=options) / payload)


def erspan3(session, sequence, timestamp, egress=True, hwid=17, key=None):
    flags = (0x1000 if sequence is not None else 0) | (0x2000 if key is not None else 0)
    gre = struct.pack("!HH", flags, 0x22EB) + (struct.pack("!I", key) if key is not None else b"") + (struct.pack("!I", sequence) if sequence is not None else b"")
    return gre + struct.pack("!HHIHH", 0x2000, session, timestamp, 0, (hwid & 0x3F) << 4 | (0x8 if egress else 0)) + INNER


def gretap(key, inner=INNER):
    return struct.pack("!HHI", 0x2000, 0x6558, key) + inner


def erspan2(session, sequence):
    return struct.pack("!HHI", 0x1000, 0x88BE, sequence) + struct.pack("!HHI", 0x1000, session, 0) + INNER


def test_fast_and_general_path_frames_give_the_pcapng_the_writer_gave_before():
    packets = [
        ipv4(erspan3(5, 1, 100)),
        ipv4(erspan3(5, 2, 99999)),  # the same stream: fast, its sequence and timestamp in the comment
        ipv4(erspan3(5, 3, 101, egress=False)),  # another stream (ingress): learnt, then fast
        ipv4(erspan3(5, 4, 102), options=b"\x94\x04\x00\x00"),  # IP options (router alert): general path
        ipv4(erspan3(5, 5, 103, key=9)),  # key and type III: another stream (and interface)
        ipv4(erspan3(5, 6, 103, key=9)),  # the same timestamp again
        ipv4(struct.pack("!HHIII", 0xB000, 0x6558, 0x1234, 8, 44) + INNER),  # checksum, key, sequence
        ipv4(struct.pack("!HHIII", 0xB000, 0x6558, 0x4321, 8, 45) + INNER),  # another checksum: the same stream
        ipv4(struct.pack("!HHIIII", 0x9000, 0x88BE, 0, 46, 0x1000_0006, 0) + INNER),  # checksum, sequence, type II
        ipv4(struct.pack("!HH", 0x0000, 0x88BE) + INNER),  # type I
        ipv4(struct.pack("!HHI", 0x1000, 0x22EB, 9) + struct.pack("!HHIHH", 0x2000, 5, 300, 0, 0x119) + bytes(8) + INNER),  # O bit: a subheader
        ipv4(struct.pack("!HHI", 0x0000, 0x0800, 0) + INNER),  # IP in GRE: no layout, general path, ignored
        *(ipv4(gretap(7, INNER + b"\x01" * extra)) for extra in range(4)),  # every padding
        ipv4(erspan2(6, 7)),  # a sequence number, no timestamp
        ipv4(erspan3(6, None, 4242)),  # a timestamp, no sequence number
        ipv4(erspan3(5, 8, 104)),  # back to the first stream
        ipv4(gretap(7)[:-30]),  # shorter than a fast-path key reads: general path
    ]
    reader = CountingReader(parse_listen("erspan://10.79.0.2"))
    blocks, kept, ignored, frames = reader.read(ring_block(packets), 0)
    assert (kept, ignored, frames) == (len(packets) - 1, 1, None)
    assert bytes(blocks) == before(packets, "erspan://10.79.0.2")
    assert reader.general == 3  # IP options, IP in GRE, the short one; the rest took the fast path
    assert descriptions(blocks) == [  # an interface per stream description, in the order first seen
        "erspan, type III, session id 5, hardware id 17",  # both directions (epb_flags tell them apart), with a GRE key or not
        "gre, key 8",
        "erspan, type II, session id 6",
        "erspan, type I",
        "gre, key 7",
        "erspan, type III, session id 6, hardware id 17",
    ]


def test_selection_cut_packets_and_junk_are_ignored_fragments_are_joined():
    joined = IP(src="10.79.0.1", dst="10.79.0.2", proto=47, id=77, flags=0) / erspan3(5, 9, 105, hwid=3) / (b"\x07" * 3000)
    pieces = [bytes(p) for p in fragment(joined, fragsize=1200)]
    packets = [
        ipv4(erspan3(5, 1, 100)),
        ipv4(erspan3(6, 2, 100)),  # another session: ignored
        ipv4(erspan3(5, 3, 100)),  # cut short by the snaplen: ignored
        ipv4(gretap(5)),  # not ERSPAN: ignored
        ipv4(b"\x00\x00\x08\x00" + bytes(40)),  # IP in GRE: not a frame, ignored
        *pieces,
        ipv4(erspan3(6, 4, 100)),
        ipv4(erspan3(5, 5, 100)),
    ]
    reader = CountingReader(parse_listen("erspan://10.79.0.2?id=5"))
    blocks, kept, ignored, _ = reader.read(ring_block(packets, cut={2}), 0)
    assert (kept, ignored) == (3, 5)
    # The joined packet has the time of its last fragment.
    expected = Expected("erspan://10.79.0.2?id=5").blocks([packets[0], bytes(joined), packets[-1]], numbers=[0, 4 + len(pieces), len(packets) - 1])
    assert bytes(blocks) == expected
    assert reader.general == len(pieces) + 1  # the fragments and the IP-in-GRE packet (cached layouts only learn Ethernet)


def test_vxlan_and_an_ipv6_underlay_and_a_limit_mid_block():
    vxlan = struct.pack("!B3xI", 0x08, 42 << 8)
    packets = [bytes(IP(src="10.79.0.1", dst="10.79.0.2", flags="DF") / UDP(sport=9, dport=4789) / (vxlan + INNER[: 60 + extra])) for extra in range(4)]
    reader = CountingReader(parse_listen("vxlan://10.79.0.2"))
    expected = Expected("vxlan://10.79.0.2", vxlan=True)
    blocks, kept, _, _ = reader.read(ring_block(packets), 0)
    assert kept == 4 and bytes(blocks) == expected.blocks(packets) and reader.general == 0
    blocks, kept, _, _ = reader.read(ring_block(packets), 0, limit=2)
    assert kept == 2 and bytes(blocks) == expected.blocks(packets[:2])  # the interface is already in the file
    six = [bytes(IPv6(src="fd00::1", dst="fd00::2", nh=47) / erspan3(5, n, 100 + n)) for n in range(3)]
    reader = CountingReader(parse_listen("erspan://[fd00::2]"), keep_frames=True)
    blocks, kept, _, frames = reader.read(ring_block(six), 0)
    assert kept == 3 and bytes(blocks) == before(six, "erspan://[fd00::2]") and frames == [INNER] * 3 and reader.general == 0



def authentication_header(next_header, payload, icv=12, sequence=1):
    """RFC 4302: next header, length (in 4 octets, less 2), reserved, SPI, sequence number, ICV."""
    return struct.pack("!BBHII", next_header, (12 + icv) // 4 - 2, 0, 0x1234, sequence) + bytes(range(icv)) + payload


def test_packets_under_ah_are_read_past_it_on_the_fast_path():
    """ERSPAN under an Authentication Header (IPv4 protocol 51, IPv6 next header 51), AH of two lengths, its
    sequence number rising: the pcapng the same packets without AH give, every one on the fast path."""
    plain = [ipv4(erspan3(5, n, 100 + n)) for n in range(5)]
    icvs = (12, 12, 16, 16, 12)
    under = [ipv4(authentication_header(47, erspan3(5, n, 100 + n), icv, n), proto=51) for n, icv in enumerate(icvs)]
    reader = CountingReader(parse_listen("erspan://10.79.0.2"))
    blocks, kept, ignored, _ = reader.read(ring_block(under), 0)
    assert (kept, ignored, reader.general) == (5, 0, 0) and bytes(blocks) == before(plain, "erspan://10.79.0.2")
    plain6 = [bytes(IPv6(src="fd00::1", dst="fd00::2", nh=47) / erspan3(5, n, 100 + n)) for n in range(5)]
    under6 = [bytes(IPv6(src="fd00::1", dst="fd00::2", nh=51) / authentication_header(47, erspan3(5, n, 100 + n), icv + 4 * (icv == 16), n)) for n, icv in enumerate(icvs)]
    reader = CountingReader(parse_listen("erspan://[fd00::2]"))
    blocks, kept, ignored, _ = reader.read(ring_block(under6), 0)
    assert (kept, ignored, reader.general) == (5, 0, 0) and bytes(blocks) == before(plain6, "erspan://[fd00::2]")


def test_a_packet_under_ah_is_never_read_as_a_stream_learnt_without_it_and_esp_is_ignored():
    """VXLAN under AH whose words sit where a learnt plain stream's key is read (AH sequence = VXLAN flags, ICV =
    the VNI) is read past AH, not as that stream; ESP (encrypted) is ignored."""
    vxlan = struct.pack("!B3xI", 0x08, 42 << 8)
    other = INNER[:-1] + b"\x06"
    plain = [bytes(IP(src="10.79.0.1", dst="10.79.0.2", flags="DF") / UDP(sport=9, dport=4789, chksum=0) / (vxlan + inner)) for inner in (INNER, other)]
    udp = plain[1][20:]
    ah = struct.pack("!BBHIII", 17, 4, 0, 0x1234, 0x0800_0000, 42 << 8) + bytes(8)  # 24 bytes
    under = bytes(IP(src="10.79.0.1", dst="10.79.0.2", proto=51, flags="DF") / (ah + udp))
    secret = bytes(IP(src="10.79.0.1", dst="10.79.0.2", proto=50, flags="DF") / (struct.pack("!II", 0x1234, 1) + udp))
    reader = CountingReader(parse_listen("vxlan://10.79.0.2"), keep_frames=True)
    blocks, kept, ignored, frames = reader.read(ring_block([plain[0], under, secret, plain[0]]), 0)
    assert (kept, ignored, frames) == (3, 1, [INNER, other, INNER])
    assert bytes(blocks) == Expected("vxlan://10.79.0.2", vxlan=True).blocks([plain[0], plain[1], plain[0]], numbers=[0, 1, 3])
    assert reader.general == 1  # ESP
