"""A tc mirror's act_bpf action writing into a BPF ring (actring.py) on a kernel that has act_bpf.

This machine's kernel is built without act_bpf; Debian's (the lane) has it. Real
frames cross a veth; src0's ingress has two filters: vtap's shape (cls_bpf
classic + one action with a 16-byte cookie, here act_bpf with the ring program,
added through netlink by actring.filter_request) and someone else's after it
(cls_bpf + mirred to mon0, added by tc). The frames must land in
the ring byte-identical (a VLAN tag the kernel took off put back), the action
must count them with its cookie, and the later filter must still see every one:
the action gives "continue", never a verdict.
"""

import os
import re
import select
import socket
import subprocess

from vtap_drivers.linux import actring, bpfring, bpfsys, tcnl
from vtap_drivers.linux.dataplane import CREATE, DUMP, RTM_GETACTION, RTM_NEWTFILTER
from vtap_drivers.linux.nlsock import RtnlSocket
from vtap_drivers.linux.pcapng import PcapngWriter

from .lane import lane_only

pytestmark = lane_only

MATCH_ALL = "1,6 0 0 262144,"
COOKIE = bytes.fromhex("a1" * 16)
OURS = [(0x28, 0, 0, 12), (0x15, 0, 1, 0x88B5), (0x06, 0, 0, 262144), (0x06, 0, 0, 0)]  # ether proto 0x88b5 (a tag is in metadata at tc)


def frames(count, vlan_every=3):
    rng = __import__("random").Random(7)
    out = []
    for i in range(count):
        tag = b"\x81\x00\x00\x2a" if i % vlan_every == 0 else b""
        out.append(b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + tag + b"\x88\xb5" + rng.randbytes(rng.randint(46, 1400)))
    return out


def test_act_bpf_writes_every_frame_into_the_ring_and_the_next_filter_still_runs(netns, tmp_path):
    from pyroute2 import netns as pr_netns

    def ip(*args):
        subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)

    def tc(*args):  # nsenter, not tc -n: that remounts /sys, and the pinned program is in the bpffs under it
        return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "tc", *args], check=True, capture_output=True, text=True).stdout

    for a, b in (("src0", "peer0"), ("mon0", "mon1")):
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        for end in (a, b):
            ip("link", "set", end, "up")
    bpfsys.ensure_bpffs()
    folder = os.path.join(bpfsys.BPFFS, f"vtap-lane-{os.getpid()}")
    os.mkdir(folder, 0o700)
    ring_path, prog_path = os.path.join(folder, "ring-sink"), os.path.join(folder, "action")
    listen = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3), flags=0)
    send = pr_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3), flags=0)
    nl = RtnlSocket(netns)
    try:
        bpfring.ensure(ring_path)
        reader = bpfring.RingReader(ring_path)
        with actring.load(reader.ring, None, bpfring.DIRECTION_IN) as action:
            bpfsys.pin(action.prog, prog_path)
            tc("qdisc", "add", "dev", "src0", "clsact")
            src0 = int(subprocess.run(["ip", "-n", netns, "-o", "link", "show", "src0"], capture_output=True, text=True, check=True).stdout.split(":")[0])
            request = actring.filter_request(src0, "ingress", 1, OURS, action.prog, COOKIE, handle=tcnl.handle_for(COOKIE))
            assert nl.requests([(request, RTM_NEWTFILTER, CREATE)]) == [None]
            tc("filter", "add", "dev", "src0", "ingress", "prio", "2", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", "mon0")
            listen.bind(("mon1", 3))
            send.bind(("peer0", 3))
            sent = frames(12)
            for frame in sent:
                send.send(frame)
            copies = 0
            while select.select([listen], [], [], 2.0)[0]:
                data, address = listen.recvfrom(65535)
                if address[2] != socket.PACKET_OUTGOING and data[12:14] in (b"\x88\xb5", b"\x81\x00"):
                    copies += 1
            assert copies == len(sent)  # the filter after vtap's saw every frame
            assert action.read_counters() == {"packets": len(sent), "bytes": sum(map(len, sent)) - 4 * len(sent[::3]), "clone_failures": 0}
            (found,) = [entry for reply in nl.dump(actring.dump_request(), RTM_GETACTION, DUMP) for entry in actring.read_actions(*reply)]
            prog_id = bpfsys.prog_info(action.prog).id
        cookie, dumped_prog, packets, _bytes = found
        assert (cookie, dumped_prog, packets) == (COOKIE, prog_id, len(sent))
        with bpfsys.prog_by_id(dumped_prog) as prog:  # what observe would check: the action writes into this ring
            assert bpfring.map_id(reader.ring) in bpfsys.prog_info(prog).map_ids
        shown = tc("-s", "actions", "ls", "action", "bpf")
        assert f"cookie {COOKIE.hex()}" in shown and "continue" in shown, shown
        assert re.search(rf"Sent \d+ bytes {len(sent)} pkt \(dropped 0", shown), shown
        with PcapngWriter.create(str(tmp_path / "ring.pcapng")) as writer:
            parts, count = reader.read()
            writer.write_epbs(parts, count)
            reader.release()
        from scapy.utils import rdpcap

        assert [packet.original for packet in rdpcap(str(tmp_path / "ring.pcapng"))] == sent
        reader.close()
    finally:
        listen.close()
        send.close()
        nl.close()
        subprocess.run(["rm", "-rf", folder])
