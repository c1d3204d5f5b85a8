"""The hookscript's plan: one guest's taps from the published document and this node's devices.

`post-start` runs inside the target's `qm start` during a live migration, so it must not wait for the
API: the node that published the desired state wrote down what it resolved through the API (see
`resolution`), and the hook needs only that and the devices it sees here. It adds what is missing for
its guest and replaces what is wrong; it removes nothing else (the agent's full reconcile does that).
`pre-stop`/`post-stop` take away what vtap has on that guest's devices here.
"""

from __future__ import annotations

import logging

from vtap_core import reconcile
from vtap_core.errors import NotFound, Unsupported, ValidationError
from vtap_drivers.proxmox.resolve import find_vm, target_nic

log = logging.getLogger("vtap.proxmox.hook")


def resolution(vms, sessions, flows, resolve) -> dict:
    """What the hook cannot know without the API: per flow its guest (vmid, identity, host devices),
    per session with a vm: target the monitoring guest's device. `resolve(vms, source)` -> (vm, nics)."""
    by_flow, targets = {}, {}
    for flow in flows:
        if flow.source.select:
            continue  # a selector's members change with the cluster: the node agent expands it each cycle
        try:
            vm, nics = resolve(vms, flow.source)
        except (NotFound, ValidationError):
            continue  # not realizable now: the agent reports it
        by_flow[flow.name] = {"vmid": vm.vmid, "identity": vm.identity, "devices": [vm.device(n) for n in nics]}
    for session in sessions:
        if session.target.kind == "vm":
            try:
                monitor = find_vm(vms, session.target.vm)
                targets[session.name] = {"vmid": monitor.vmid, "device": monitor.device(target_nic(monitor, session.target.mac))}
            except (NotFound, ValidationError):
                continue
    return {"flows": by_flow, "targets": targets}


def guest_bindings(dataplane, resolved: dict, sessions, flows, vmid: int, problems: list) -> list:
    """The bindings of this guest's flows whose devices exist here (targets of other guests must too)."""
    present = dataplane.devices()
    chosen = {name: entry for name, entry in resolved.get("flows", {}).items() if entry.get("vmid") == vmid}
    bindings = []
    for session in sessions:
        if not session.enabled:
            continue
        members = [f for f in flows if f.session == session.name and f.name in chosen]
        if not members:
            continue
        target_device = None
        if session.target.kind == "vm":
            target_device = resolved.get("targets", {}).get(session.name, {}).get("device")
            if target_device not in present:
                problems.append((session.name, None, f"monitoring guest's device {target_device} is not on this node"))
                continue
        for flow in members:
            entry = chosen[flow.name]
            for device in entry["devices"]:
                if device not in present:
                    continue  # a NIC without a device here (link down, not plugged): the agent looks again
                try:
                    bindings.extend(dataplane.plan_vm_device(session, flow, device, vm=entry["identity"], target_device=target_device))
                except (ValidationError, Unsupported, NotFound) as exc:
                    problems.append((session.name, flow.name, str(exc)))
    return bindings


def apply_guest(driver, resolved: dict, sessions, flows, vmid: int) -> reconcile.Plan:
    """post-start: add this guest's missing bindings (and replace wrong ones); nothing else is removed."""
    from vtap_drivers.linux.dataplane import unique

    problems: list = []
    wanted = unique(guest_bindings(driver.dataplane, resolved, sessions, flows, vmid, problems))
    plan = reconcile.diff(wanted, driver.observe())
    keys = {b.key for b in wanted}
    plan.remove = [b for b in plan.remove if b.key in keys]
    plan.problems = problems
    reconcile.execute(driver, plan)
    return plan


def remove_guest(driver, resolved: dict, vmid: int) -> reconcile.Plan:
    """pre-stop/post-stop: what vtap has on this guest's devices here goes."""
    devices = {d for entry in resolved.get("flows", {}).values() if entry.get("vmid") == vmid for d in entry["devices"]}
    plan = reconcile.Plan(remove=[b for b in driver.observe() if b.get("device") in devices])
    reconcile.execute(driver, plan)
    return plan
