"""The follower's event source: one PropertyCollector over container views.

WaitForUpdatesEx on the properties that matter (a VM's host, power state and
configuration version, which moves whenever its NICs' port keys do; a switch's
mirror sessions). Yields a
VM's instance UUID when one of its properties changed, None when a switch's
sessions changed (drift: a vtap session edited or removed by someone else) or
a monitoring VM changed host: whether a dvPortMirror session delivers depends
on the hosts of its source and monitoring VMs together, and the bindings that
change are those of the source VMs, not the monitoring VM's.
Nothing is polled per VM; vSphere tags, which have no change events, are
read for all VMs at once by the driver's tick (see tagging.py).
"""

from __future__ import annotations

import threading
from typing import Iterator

from pyVmomi import vim, vmodl

from vtap_core.model import parse_uuid

# A NIC's port key lives in config.hardware.device; every change to it changes the configuration
# and so config.changeVersion, which is what is watched: the device lists of every VM would make
# the first answer huge (seconds to parse at 1,000 VMs) for no gain.
VM_WATCHED = ["config.instanceUuid", "runtime.host", "runtime.powerState", "config.changeVersion", "customValue", "parent"]  # the last two: selectors (tags, folder)
SWITCH_WATCHED = ["config.vspanSession"]
WAIT_SECONDS = 1  # how long one WaitForUpdatesEx may block: bounds how late a stop is noticed


def updates(content, stop: threading.Event, changed=lambda moref_id: None, monitoring=lambda uuid: False, tick=lambda: ()) -> Iterator[str | None]:
    """Hints; changed(moref id) is called for a VM before its hint is yielded; monitoring(uuid)
    tells whether a VM is a monitoring VM (its move is a hint about every VM); tick() is asked
    between waits for moref ids of VMs changed where no property shows it (vSphere tags)."""
    pc_type = vmodl.query.PropertyCollector
    collector = content.propertyCollector.CreatePropertyCollector()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine, vim.dvs.VmwareDistributedVirtualSwitch], True)
    try:
        traversal = pc_type.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        spec = pc_type.FilterSpec(
            objectSet=[pc_type.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
            propSet=[
                pc_type.PropertySpec(type=vim.VirtualMachine, pathSet=VM_WATCHED),
                pc_type.PropertySpec(type=vim.dvs.VmwareDistributedVirtualSwitch, pathSet=SWITCH_WATCHED),
            ],
        )
        collector.CreateFilter(spec, partialUpdates=True)
        uuids = {}  # VM moref id -> instance UUID (changes carry only what changed)
        version = ""
        initial = True  # the first answer (in parts when vCenter truncates it) is the whole current state
        options = pc_type.WaitOptions(maxWaitSeconds=WAIT_SECONDS)
        while not stop.is_set():
            for moref_id in () if initial else tick():
                changed(moref_id)
                if uuids.get(moref_id):
                    yield uuids[moref_id]
            result = collector.WaitForUpdatesEx(version, options)
            if result is None:
                continue
            version = result.version
            look_at_everything = False
            for filter_update in result.filterSet:
                for update in filter_update.objectSet:
                    if isinstance(update.obj, vim.VirtualMachine):
                        for change in update.changeSet:
                            if change.name == "config.instanceUuid" and change.val:
                                uuids[update.obj._moId] = parse_uuid(change.val)
                        uuid = uuids.get(update.obj._moId)
                        moved = any(change.name == "runtime.host" for change in update.changeSet)
                        look_at_everything |= moved and not initial and monitoring(uuid)
                        if update.kind == "leave":
                            uuids.pop(update.obj._moId, None)
                        if not initial:
                            changed(update.obj._moId)
                            if uuid:
                                yield uuid
                    elif not initial:
                        look_at_everything = True
            if look_at_everything:
                yield None
            initial = initial and bool(result.truncated)
    finally:
        for cleanup in (collector.DestroyPropertyCollector, view.DestroyView):
            try:
                cleanup()
            except Exception:  # the session may be gone; the server drops them with it
                pass
