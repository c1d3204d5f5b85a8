"""Which kind of host-side device a libvirt NIC has (decides the tc hooks): pure, from domain XML."""

from vtap_drivers.kvm.devices import MACVTAP, PASSTHROUGH, TAP, device_kind
from vtap_drivers.kvm.domains import vm_of

DOMAIN = """<domain type='kvm'><name>mixed</name><uuid>6d1f5c1e-0000-4000-8000-000000000009</uuid><devices>
  <interface type='bridge'><mac address='52:54:00:aa:00:01'/><source bridge='br0'/><target dev='vnet7'/></interface>
  <interface type='direct'><mac address='52:54:00:aa:00:02'/><source dev='eth0' mode='bridge'/><target dev='macvtap3'/></interface>
  <interface type='hostdev'><mac address='52:54:00:aa:00:03'/><source><address type='pci' bus='0x03' slot='0x00' function='0x1'/></source></interface>
  <interface type='vdpa'><mac address='52:54:00:aa:00:04'/><source dev='/dev/vhost-vdpa-0'/></interface>
  <interface type='network'><mac address='52:54:00:aa:00:05'/><source network='direct-net'/><target dev='macvtap4'/></interface>
</devices></domain>"""


def test_device_kind_per_libvirt_interface_type():
    nics = vm_of("6d1f5c1e-0000-4000-8000-000000000009", "mixed", 1, DOMAIN).nics
    assert [device_kind(nic) for nic in nics] == [TAP, MACVTAP, PASSTHROUGH, PASSTHROUGH, TAP]


def test_a_network_nic_the_kernel_calls_macvtap_is_a_macvtap():
    nic = vm_of("6d1f5c1e-0000-4000-8000-000000000009", "mixed", 1, DOMAIN).nics[4]
    assert device_kind(nic, kernel_kind="macvtap") == MACVTAP
    assert device_kind(nic, kernel_kind="tun") == TAP
