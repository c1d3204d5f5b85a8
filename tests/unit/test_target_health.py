"""targethealth: what the link read-back says about copies reaching the target (pure: link dicts as tcnl.read_link gives)."""

from vtap_drivers.linux.targethealth import NO_ROUTE, health

UP = 0x1 | 0x40


def link(name, mtu, kind="veth", flags=UP, remote=None, tx_dropped=0, tx_errors=0):
    return {"name": name, "mtu": mtu, "kind": kind, "flags": flags, "tx_dropped": tx_dropped, "tx_errors": tx_errors, "vxlan": {"remote": remote} if remote else None}


def test_a_target_mtu_below_the_source_mtu_is_a_cut():
    found = health(link("vnet0", 1500), link("mon0", 1000, tx_dropped=4))
    assert found.cut.startswith("target mon0 MTU 1000 < source vnet0 MTU 1500") and found.tx_dropped == 4
    assert health(link("vnet0", 1500), link("mon0", 1500)).cut == ""


def test_a_target_without_carrier_is_a_cut():
    assert "no carrier" in health(link("vnet0", 1500), link("mon0", 1500, flags=0x1)).cut


def test_vxlan_is_judged_by_its_underlay_ipv4_and_ipv6():
    vxlan4, vxlan6 = link("vtapx1", 1450, "vxlan", remote="192.0.2.9"), link("vtapx2", 1450, "vxlan", remote="2001:db8::9")
    assert health(link("vnet0", 1500), vxlan4, ("eth0", 1568)).note == ""  # 1500 + 14 + 4 + 50 fits exactly
    assert "eth0 MTU 1500 < 1568 bytes" in health(link("vnet0", 1500), vxlan4, ("eth0", 1500)).note
    assert "< 1588 bytes" in health(link("vnet0", 1500), vxlan6, ("eth0", 1500)).note
    assert health(link("vnet0", 1500), vxlan4, ("eth0", 1500)).cut == ""  # fragments arrive: not a cut


def test_a_vxlan_remote_without_a_route_is_a_cut():
    vxlan = link("vtapx1", 1500, "vxlan", remote="192.0.2.9")
    assert "no route to VXLAN remote 192.0.2.9" in health(link("vnet0", 1500), vxlan, NO_ROUTE).cut
    assert health(link("vnet0", 1500), vxlan, None).cut == ""  # unknown is not a verdict
