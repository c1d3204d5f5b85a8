"""Domain XML -> VM, and the ovs backend's marks: pure functions, no libvirt or OVS needed."""

from vtap_core.model import Target
from vtap_drivers.kvm.domains import vm_of
from vtap_drivers.kvm.ovs import _decode, _encode, mirror_binding, tunnel_binding, tunnel_options

DOMAIN = """<domain type='kvm'><name>web</name><uuid>6d1f5c1e-0000-4000-8000-000000000001</uuid><devices>
  <interface type='bridge'><mac address='52:54:00:AA:00:01'/><source bridge='br0'/><target dev='vnet7'/></interface>
  <interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='ovsbr'/>
    <virtualport type='openvswitch'><parameters interfaceid='0e2c9a5e-1111-4222-8333-444455556666'/></virtualport>
    <target dev='vnet8'/></interface>
  <interface type='network'><mac address='52:54:00:aa:00:03'/><source network='default'/></interface>
</devices></domain>"""


def test_running_domain_nics_with_devices_networks_and_virtualport():
    vm = vm_of("6d1f5c1e-0000-4000-8000-000000000001", "web", 1, DOMAIN, host="h1")
    assert (vm.state, vm.host) == ("running", "h1")
    assert [(n.mac, n.device, n.network) for n in vm.nics] == [
        ("52:54:00:aa:00:01", "vnet7", "br0"),
        ("52:54:00:aa:00:02", "vnet8", "ovsbr"),
        ("52:54:00:aa:00:03", None, "default"),
    ]
    assert vm.nics[1].details == {"type": "bridge", "virtualport": "openvswitch", "interfaceid": "0e2c9a5e-1111-4222-8333-444455556666"}


def test_a_stopped_domain_has_no_devices_even_if_its_xml_names_old_ones():
    vm = vm_of("6d1f5c1e-0000-4000-8000-000000000001", "web", 5, DOMAIN)
    assert vm.state == "shutoff"
    assert [n.device for n in vm.nics] == [None, None, None]


def test_ovs_marks_give_back_exactly_the_planned_binding():
    for binding in (
        mirror_binding("s", "s-1", "6d1f5c1e-0000-4000-8000-000000000001", "br0", "vnet7", "both", "mon0", 128),
        tunnel_binding("s", "br0", Target.parse("erspan://10.0.0.9?version=2&id=3")),
    ):
        assert _decode(_encode(binding)) == binding


def test_tunnel_options_follow_ovs_names():
    assert tunnel_options(Target.parse("gre://10.0.0.9?key=7")) == {"remote_ip": "10.0.0.9", "key": "7"}
    assert tunnel_options(Target.parse("vxlan://10.0.0.9?vni=5")) == {"remote_ip": "10.0.0.9", "key": "5", "dst_port": "4789"}
    # vtap's ERSPAN type II / III are OVS's erspan_ver 1 / 2
    assert tunnel_options(Target.parse("erspan://10.0.0.9?version=2&id=3"))["erspan_ver"] == "1"
    assert tunnel_options(Target.parse("erspan://10.0.0.9?version=3&id=3"))["erspan_ver"] == "2"
