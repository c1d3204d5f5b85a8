"""What reaches the target side: copies longer than the target takes, a target that is down, a VXLAN underlay.

    peer0 -- src0 (mirrored, MTU 1500)         [test namespace, `vtap` runs here]
    mon0  -- mon1  port target, copies counted on mon1
    u0 10.78.0.1/24 ------- u1 10.78.0.2/24    [collector namespace: a plain UDP socket]

Frames are sent on peer0 (src0's `in`); `vtap status -o json` is read as a user reads it.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from datapaths import on_both_datapaths
from tc_lab import lab, new_marker, receive  # noqa: F401 (lab: the fixture)

COLLECTOR = "10.78.0.2"


def vtap(lab, *args, check=True):
    env = dict(os.environ, VTAP_LINUX_NETNS=lab.netns, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    result = subprocess.run(["vtap", "--state", f"{lab.state_dir}/vtap.db", *args], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result
    return result


def status(lab) -> dict:
    return {row["flow"]: row for row in json.loads(vtap(lab, "status", "-o", "json").stdout)}


def frames(marker, payload, n):
    return [b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + marker + b"p" * (payload - len(marker))] * n


@on_both_datapaths
def test_copies_longer_than_the_target_mtu_are_counted_as_dropped_and_the_flow_is_degraded(lab):
    lab.standard()
    for end in ("mon0", "mon1"):
        lab.ip("link", "set", end, "mtu", "1000")
    vtap(lab, "session", "create", "s", "--to", "port:mon0")
    vtap(lab, "flow", "add", "s", "--interface", "src0", "--direction", "in", "--name", "f")
    row = status(lab)["f"]
    assert row["state"] == "degraded"
    assert "target mon0 MTU 1000 < source src0 MTU 1500" in row["problem"]

    copies = lab.packet_socket("mon1")
    marker = new_marker()
    lab.send("peer0", frames(marker, 200, 3) + frames(marker, 1400, 4))
    assert len(receive(copies, marker)) == 3  # the 4 long ones never reach the target
    row = status(lab)["f"]
    assert (row["packets"], row["dropped"]) == (7, 4)  # both counts: copies made, copies the target did not take
    assert row["target_tx_dropped"] >= 4
    assert "4 copies dropped at target mon0" in row["problem"]

    for end in ("mon0", "mon1"):
        lab.ip("link", "set", end, "mtu", "1500")
    lab.send("peer0", frames(marker, 1400, 2))
    assert len(receive(copies, marker)) == 2
    row = status(lab)["f"]
    assert (row["state"], row["packets"], row["dropped"]) == ("active", 9, 4)
    copies.close()


@on_both_datapaths
def test_a_target_without_carrier_makes_the_flow_degraded(lab):
    lab.standard()
    vtap(lab, "session", "create", "s", "--to", "port:mon0")
    vtap(lab, "flow", "add", "s", "--interface", "src0", "--direction", "in", "--name", "f")
    assert status(lab)["f"]["state"] == "active"
    lab.ip("link", "set", "mon1", "down")  # mon0 stays up, without carrier: a veth drops what it sends
    marker = new_marker()
    lab.send("peer0", frames(marker, 100, 3))
    row = status(lab)["f"]
    assert row["state"] == "degraded" and "target mon0 is down or has no carrier" in row["problem"]
    assert row["dropped"] == 3


@pytest.fixture
def underlay(lab):
    """A collector namespace behind u0/u1, whose link has MTU 1400; yields a UDP socket on 4789 there."""
    from pyroute2 import netns as pr_netns

    name = f"{lab.netns}-c"
    pr_netns.create(name)
    sock = None
    try:
        lab.standard()
        lab.ip("link", "add", "u0", "mtu", "1400", "type", "veth", "peer", "name", "u1", "netns", name)
        lab.ip("addr", "add", "10.78.0.1/24", "dev", "u0")
        lab.ip("link", "set", "u0", "up")
        for args in (["link", "set", "u1", "mtu", "1400"], ["addr", "add", f"{COLLECTOR}/24", "dev", "u1"], ["link", "set", "u1", "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", name, *args], check=True)
        sock = pr_netns.create_socket(name, socket.AF_INET, socket.SOCK_DGRAM, 0, flags=0)
        sock.bind(("0.0.0.0", 4789))
        yield sock
    finally:
        if sock is not None:
            sock.close()
        pr_netns.remove(name)


@on_both_datapaths
def test_vxlan_copies_larger_than_the_underlay_mtu_arrive_whole_and_status_notes_the_fragments(lab, underlay):
    vtap(lab, "session", "create", "t", "--to", f"vxlan://{COLLECTOR}?vni=77")
    vtap(lab, "flow", "add", "t", "--interface", "src0", "--direction", "in", "--name", "f")
    marker = new_marker()
    sent = frames(marker, 1400, 3)
    lab.send("peer0", sent)
    got = []
    underlay.settimeout(2.0)
    try:
        while len(got) < 3:
            data = underlay.recv(65535)
            if marker in data:
                got.append(data[8:])  # the VXLAN header off: the inner frame
    except socket.timeout:
        pass
    assert got == sent  # 1414-byte frames + 50 bytes of encapsulation over a 1400 link: reassembled whole
    row = status(lab)["f"]
    assert row["state"] == "active" and row["dropped"] == 0
    assert "VXLAN underlay u0 MTU 1400 < 1568 bytes" in row["problem"] and "IP fragments" in row["problem"]


@on_both_datapaths
def test_a_vxlan_target_without_a_route_to_its_remote_is_degraded(lab):
    lab.standard()  # no address, no route: 10.79.0.2 is unreachable from this namespace
    vtap(lab, "session", "create", "t", "--to", "vxlan://10.79.0.2?vni=78")
    vtap(lab, "flow", "add", "t", "--interface", "src0", "--direction", "in", "--name", "f")
    lab.send("peer0", frames(new_marker(), 100, 3))
    row = status(lab)["f"]
    assert row["state"] == "degraded" and "no route to VXLAN remote 10.79.0.2" in row["problem"]
    assert row["packets"] == 3 and row["target_tx_dropped"] + row["target_tx_errors"] >= 3
