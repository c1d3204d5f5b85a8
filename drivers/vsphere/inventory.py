"""Reading VMs and switches from vCenter in a constant number of round trips.

Flow VMs are looked up by UUID through the SearchIndex (instance UUID, then
BIOS UUID) and their properties read in one RetrievePropertiesEx; switches
come from one container view. Nothing here walks the inventory per VM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pyVmomi import vim, vmodl

from vtap_core.model import VM, Nic, parse_uuid

# Read every time (small): what tells whether the rest changed.
VM_VERSION = ["config.changeVersion", "runtime.powerState"]
SWITCH_VERSION = ["config.configVersion"]
# Read again only when those moved (a rename or a NIC change moves changeVersion; the switch's
# capability, uplink names and sessions change with its configVersion).
VM_DETAILS = ["name", "config.uuid", "config.instanceUuid", "config.hardware.device"]
SWITCH_DETAILS = ["name", "config.uplinkPortPolicy", "capability.featuresSupported", "config.vspanSession"]
POWER = {"poweredOn": "running", "poweredOff": "shut off", "suspended": "paused"}


@dataclass
class VmNic:
    mac: str
    device_key: int
    label: str
    switch_uuid: str | None = None
    portgroup_key: str | None = None
    port_key: str | None = None


@dataclass
class VmRecord:
    ref: object
    uuid: str  # instance UUID: what vtap follows
    bios_uuid: str | None
    name: str
    host: str | None
    power: str
    nics: list = field(default_factory=list)

    def to_vm(self) -> VM:
        return VM(
            uuid=self.uuid,
            name=self.name,
            state=POWER.get(self.power, self.power),
            host=self.host,
            nics=tuple(
                Nic(mac=n.mac, device=n.port_key, network=n.portgroup_key, details={"switch": n.switch_uuid, "label": n.label})
                for n in self.nics
            ),
            details={"bios_uuid": self.bios_uuid},
        )


@dataclass
class SwitchRecord:
    ref: object
    uuid: str
    name: str
    version: str
    sessions: list
    uplink_names: tuple
    vspan: object  # VMwareDVSVspanCapability or None


def nics_of(devices) -> list[VmNic]:
    nics = []
    for device in devices or ():
        if not isinstance(device, vim.vm.device.VirtualEthernetCard):
            continue
        nic = VmNic(mac=(device.macAddress or "").lower(), device_key=device.key, label=device.deviceInfo.label if device.deviceInfo else "")
        backing = device.backing
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo) and backing.port:
            nic.switch_uuid = backing.port.switchUuid
            nic.portgroup_key = backing.port.portgroupKey
            nic.port_key = backing.port.portKey
        nics.append(nic)
    return nics


def retrieve(content, objects, kind, properties, traverse_view=False):
    """{moref: {property: value}} for objects, in one RetrievePropertiesEx (+ continuations)."""
    pc = vmodl.query.PropertyCollector
    if traverse_view:
        traversal = pc.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        object_set = [pc.ObjectSpec(obj=objects, skip=True, selectSet=[traversal])]
    else:
        object_set = [pc.ObjectSpec(obj=obj, skip=False) for obj in objects]
    if not object_set:
        return {}
    spec = pc.FilterSpec(objectSet=object_set, propSet=[pc.PropertySpec(type=kind, pathSet=properties)])
    found = {}
    result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
    while result is not None:
        for item in result.objects:
            found[item.obj] = {p.name: p.val for p in item.propSet}
        if not result.token:
            break
        result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
    return found


class Reader:
    """Reads objects' properties; the heavy ones only for objects whose version changed.

    Every read asks vCenter (level-triggered: the answer is always today's), but a VM's
    device list or a switch's session list is parsed again only when its version property
    (VirtualMachineConfigInfo.changeVersion, DVSConfigInfo.configVersion: "each change to the
    configuration updates this value") moved. Parsing them is most of the cost at scale.
    """

    def __init__(self, kind, light, versions, heavy, max_age=0.0):
        self.kind, self.light, self.versions, self.heavy = kind, light, versions, heavy
        self._seen = {}  # moref id -> (versions, heavy properties)
        # A light read is reused until invalidate() (at most max_age seconds): one vtap command
        # plans the same state three times in a row before it observes and applies; the driver
        # invalidates whenever it observes, and the follower's watch whenever vCenter reports a
        # change to a VM, so a command or a hint always starts from a fresh read.
        self.max_age = max_age
        self._fresh = {}  # moref id -> (time of the light read, light properties)

    def invalidate(self, moref_id=None):
        if moref_id is None:
            self._fresh.clear()
        else:
            self._fresh.pop(moref_id, None)

    def read(self, content, objects, traverse_view=False) -> dict:
        found = None if traverse_view else self._recent(objects)
        if found is None:
            found = retrieve(content, objects, self.kind, sorted(set(self.light + self.versions)), traverse_view)
            now = time.monotonic()
            for ref, props in found.items():
                self._fresh[ref._moId] = (now, dict(props))

        def version(props):
            return tuple(str(props.get(name)) for name in self.versions)

        stale = [ref for ref, props in found.items() if props.get(self.versions[0]) is None or self._seen.get(ref._moId, (None,))[0] != version(props)]
        if stale:
            heavy = retrieve(content, stale, self.kind, self.heavy)
            for ref in stale:
                self._seen[ref._moId] = (version(found[ref]), heavy.get(ref, {}))
        for ref, props in found.items():
            props.update(self._seen[ref._moId][1])
        return found

    def _recent(self, objects):
        if not self.max_age or not objects:
            return None
        now = time.monotonic()
        reads = [self._fresh.get(ref._moId) for ref in objects]
        if any(read is None or now - read[0] > self.max_age for read in reads):
            return None
        return {ref: dict(read[1]) for ref, read in zip(objects, reads)}

    def forget(self):
        self._seen.clear()
        self._fresh.clear()


def vm_reader(with_host=False, max_age=0.0) -> Reader:
    # Power state too: a port of an ephemeral portgroup is bound at power-on. A migration
    # keeps the ports, so planning does not need the host; `vm list` does (with_host).
    return Reader(vim.VirtualMachine, ["runtime.host"] if with_host else [], VM_VERSION, VM_DETAILS, max_age)


def listing_reader() -> Reader:
    # `vm list` and selectors: the host, the folder and the custom attribute values too.
    return Reader(vim.VirtualMachine, ["runtime.host", "parent", "customValue"], VM_VERSION, VM_DETAILS)


def names_of(content, view_of) -> dict:
    """moref id -> name of hosts and portgroups, and folder id -> inventory path, in three reads.

    Selectors match `host=` and `network=` by name as people write them, and `folder=` by
    the path the vSphere client shows (/DC0/vm/dmz).
    """
    names = {}
    for kind in (vim.HostSystem, vim.dvs.DistributedVirtualPortgroup):
        names.update({ref._moId: props.get("name") for ref, props in retrieve(content, view_of(content, kind), kind, ["name"], True).items()})
    parents = {}
    for kind in (vim.Folder, vim.Datacenter):
        for ref, props in retrieve(content, view_of(content, kind), kind, ["name", "parent"], True).items():
            parents[ref._moId] = (props.get("name"), getattr(props.get("parent"), "_moId", None))
    root = content.rootFolder._moId

    def path(moid):
        parts = []
        while moid in parents and moid != root:
            name, moid = parents[moid]
            parts.append(name)
        return "/" + "/".join(reversed(parts))

    names.update({f"folder:{moid}": path(moid) for moid in parents})
    return names


def custom_attributes(content, values) -> tuple[str, ...]:
    """A VM's custom attribute values as tags: NAME:VALUE, and each word of an attribute named `tags`."""
    fields = {f.key: f.name for f in (content.customFieldsManager.field or ())} if content.customFieldsManager else {}
    tags = []
    for value in values or ():
        name, text = fields.get(value.key), str(getattr(value, "value", "") or "")
        if name is None or not text:
            continue
        if name.lower() == "tags":
            tags.extend(t for t in text.replace(";", ",").replace(" ", ",").split(",") if t)
        else:
            tags.append(f"{name}:{text}")
    return tuple(dict.fromkeys(tags))


def switch_reader() -> Reader:
    # VmwareDistributedVirtualSwitch, not DistributedVirtualSwitch: vCenter checks a path against
    # the PropertySpec's type, and vspanSession exists only on VMwareDVSConfigInfo.
    return Reader(vim.dvs.VmwareDistributedVirtualSwitch, ["uuid"], SWITCH_VERSION, SWITCH_DETAILS)


def vm_record(ref, props) -> VmRecord:
    instance = parse_uuid(props.get("config.instanceUuid")) if props.get("config.instanceUuid") else None
    bios = parse_uuid(props.get("config.uuid")) if props.get("config.uuid") else None
    host = props.get("runtime.host")
    return VmRecord(
        ref=ref,
        uuid=instance or bios or ref._moId,
        bios_uuid=bios,
        name=props.get("name", ref._moId),
        host=getattr(host, "_moId", None),
        power=str(props.get("runtime.powerState", "unknown")),
        nics=nics_of(props.get("config.hardware.device")),
    )


def switch_record(ref, props) -> SwitchRecord:
    features = props.get("capability.featuresSupported")
    policy = props.get("config.uplinkPortPolicy")
    return SwitchRecord(
        ref=ref,
        uuid=props.get("uuid"),
        name=props.get("name", ref._moId),
        version=props.get("config.configVersion"),
        sessions=list(props.get("config.vspanSession") or ()),
        uplink_names=tuple(getattr(policy, "uplinkPortName", None) or ()),
        vspan=getattr(features, "vspanCapability", None) if getattr(features, "vspanSupported", False) else None,
    )
