"""Which VM and which NICs a flow's source names, on a PVE cluster.

A VM is named by its smbios1 UUID, its name, or its vmid (the only handle of a VM without an smbios1
UUID). One NIC is chosen by MAC (--nic), or by PVE's own key with a suffix: `--vm 101/net1`.
"""

from __future__ import annotations

import re

from vtap_core.errors import NotFound, ValidationError
from vtap_core.model import parse_uuid

NIC_SUFFIX = re.compile(r"^(?P<vm>.+)/net(?P<index>\d+)$")


def find_vm(vms, reference: str):
    """The one VM `reference` names: UUID, vmid, or name (a name shared by two VMs is refused)."""
    text = str(reference).strip()
    uuid = parse_uuid(text) if text.count("-") == 4 else None
    if uuid:
        found = [vm for vm in vms if vm.uuid == uuid]
    elif text.isdigit():
        found = [vm for vm in vms if vm.vmid == int(text)]
    else:
        found = [vm for vm in vms if vm.name == text]
    if not found:
        kind = "UUID" if uuid else "vmid" if text.isdigit() else "name"
        raise NotFound(f"vm: no VM with {kind} {text!r} on this cluster")
    if len(found) > 1:
        ids = ", ".join(str(vm.vmid) for vm in found)
        raise ValidationError("vm", f"the name {text!r} is shared by VMs {ids}: use the UUID or vmid")
    return found[0]


def split_reference(text: str) -> tuple[str, int | None]:
    """("101", 1) for "101/net1"; (text, None) when there is no /netN suffix."""
    match = NIC_SUFFIX.match(text)
    if match and not parse_uuid(text):
        return match.group("vm"), int(match.group("index"))
    return text, None


def resolve_source(vms, source):
    """(vm, nics) for a flow's Source."""
    reference, index = split_reference(source.vm)
    vm = find_vm(vms, reference)
    nics = list(vm.nics)
    have = ", ".join(n.key for n in nics) or "none"
    if index is not None:
        nics = [n for n in nics if n.index == index]
        if not nics:
            raise ValidationError("nic", f"VM {vm.vmid} ({vm.name}) has no net{index}; its NICs: {have}")
    if source.nic:
        nics = [n for n in nics if n.mac == source.nic]
        if not nics:
            raise ValidationError("nic", f"VM {vm.vmid} ({vm.name}) has no NIC with MAC {source.nic}; its NICs: {have}")
    return vm, nics


def target_nic(vm, mac: str | None):
    """The monitoring VM's NIC a vm: target names (its first NIC when no MAC is given)."""
    nics = [n for n in vm.nics if mac is None or n.mac == mac]
    if not nics:
        what = f"a NIC with MAC {mac}" if mac else "any NIC"
        raise ValidationError("target", f"monitoring VM {vm.vmid} ({vm.name}) has no {what}")
    return nics[0]
