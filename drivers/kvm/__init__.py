"""vtap kvm driver: libvirt inventory and events; tc or Open vSwitch data path.

Import-cheap on purpose (no libvirt here): the CLI reads SETTINGS to resolve
--uri / $VTAP_LIBVIRT_URI / the [kvm] config section before loading anything.
"""

# ovsdb: for the ovs backend; datapath: tc (default) or tcx for the tc backend (drivers/linux/tcxmirror.py)
SETTINGS = {"uri": "VTAP_LIBVIRT_URI", "ovsdb": "VTAP_OVSDB", "datapath": "VTAP_DATAPATH"}
DEFAULT_URI = "qemu:///system"
