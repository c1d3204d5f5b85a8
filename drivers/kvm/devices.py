"""What kind of host-side device a libvirt NIC has, and so which tc hook sees what the VM sends.

- tap (`bridge`, `network`, `ethernet`, ... : vnetN): the VM writes into the tap
  and the host device *receives* it: VM `out` = the device's ingress hook.
- macvtap (`direct`, or a device the kernel calls macvtap): the VM writes into
  /dev/tapN and the kernel *transmits* it on the macvtap device towards the
  lower (physical) NIC: VM `out` = the device's egress hook, the reverse of a tap.
  A copy mirrored to a macvtap device's egress leaves by that physical NIC and
  never reaches the guest, so a macvtap NIC cannot be a `vm:` target.
- passthrough (`hostdev`, `vdpa`): the NIC is the guest's own hardware; the host
  has no device whose hooks see its frames, so nothing can be mirrored.
"""

from __future__ import annotations

from vtap_core.model import Nic

TAP, MACVTAP, PASSTHROUGH = "tap", "macvtap", "passthrough"
PASSTHROUGH_TYPES = frozenset({"hostdev", "vdpa"})


def device_kind(nic: Nic, kernel_kind: str | None = None) -> str:
    """tap, macvtap or passthrough; kernel_kind is IFLA_INFO_KIND of nic.device when known."""
    libvirt_type = nic.details.get("type")
    if libvirt_type in PASSTHROUGH_TYPES:
        return PASSTHROUGH
    if libvirt_type == "direct" or kernel_kind == "macvtap":
        return MACVTAP
    return TAP


def no_host_device(nic: Nic, vm_name: str) -> str:
    """Why a passthrough NIC cannot be mirrored (follows "NIC passthrough: " in messages)."""
    return f"no host-side device for NIC {nic.mac} of VM {vm_name} ({nic.details.get('type')})"
