"""Whether a mirror's copies can reach its target whole: MTUs and transmit counters, read from the kernel.

What the kernel does with a copy longer than the target takes (checked on
this kernel, see tests/functional/linux/test_tc_target_health.py):

- a target device that is down (or without carrier) drops every copy.
- veth and other local devices: a frame longer than the device's MTU is
  dropped on transmit. mirred counts it as an overlimit of its action (the
  flow's `dropped`), the device as a tx drop. A target MTU smaller than the
  source's is therefore a cut: bigger copies never arrive.
- vtap's VXLAN device without a route to its remote drops every copy.
- vtap's VXLAN device: the kernel does not hold a mirrored copy to the VXLAN
  device's own MTU; it encapsulates the whole frame and the outer UDP packet
  leaves in IP fragments when the underlay route's MTU is too small (vtap's
  VXLAN devices never set DF). The collector must reassemble them: shown as
  a note, copies are not lost.

The links are the dicts of tcnl.read_link (name, kind, mtu, tx_dropped, tx_errors, vxlan).
"""

from __future__ import annotations

from vtap_core.driver import TargetHealth

ETH_HLEN = 14
VLAN_HLEN = 4  # a guest's frame may carry an 802.1Q tag
VXLAN_OVERHEAD = {4: 50, 6: 70}  # outer Ethernet + IP + UDP + VXLAN header
NO_ROUTE = ("", 0)  # the underlay of a VXLAN remote the kernel has no route to
IFF_UP, IFF_RUNNING = 0x1, 0x40  # RUNNING: up with a carrier (a veth whose peer is down has none)


def full_copy_bytes(source_mtu: int) -> int:
    """The longest frame a device of this MTU passes: payload, Ethernet header and a VLAN tag."""
    return source_mtu + ETH_HLEN + VLAN_HLEN


def health(source: dict, target: dict, underlay=None) -> TargetHealth:
    """source/target: links; underlay: (device name, MTU) of the route to a VXLAN target's remote, NO_ROUTE, or None (unknown)."""
    found = TargetHealth(device=target["name"] or "", tx_dropped=target["tx_dropped"], tx_errors=target["tx_errors"])
    if target["flags"] & (IFF_UP | IFF_RUNNING) != IFF_UP | IFF_RUNNING:
        return TargetHealth(found.device, found.tx_dropped, found.tx_errors, cut=f"target {target['name']} is down or has no carrier: copies are dropped")
    if not source["mtu"] or not target["mtu"]:
        return found
    if target["kind"] == "vxlan":
        if underlay is None:
            return found
        remote = target["vxlan"]["remote"] if target["vxlan"] else ""
        if underlay == NO_ROUTE:  # the VXLAN device drops them (its tx counters), mirred never hears of it
            return TargetHealth(found.device, found.tx_dropped, found.tx_errors, cut=f"no route to VXLAN remote {remote}: copies are dropped")
        needed = full_copy_bytes(source["mtu"]) + VXLAN_OVERHEAD[6 if ":" in (remote or "") else 4]
        device, mtu = underlay
        if mtu and mtu < needed:
            note = f"VXLAN underlay {device} MTU {mtu} < {needed} bytes of a full-size copy from {source['name']} (MTU {source['mtu']}) encapsulated: such copies leave as IP fragments"
            return TargetHealth(found.device, found.tx_dropped, found.tx_errors, note=note)
        return found
    if target["mtu"] < source["mtu"]:
        cut = f"target {target['name']} MTU {target['mtu']} < source {source['name']} MTU {source['mtu']}: copies longer than its MTU are dropped"
        return TargetHealth(found.device, found.tx_dropped, found.tx_errors, cut=cut)
    return found
