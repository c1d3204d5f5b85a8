"""What runs where on a PVE cluster, kept cheap to poll.

One poll costs /cluster/resources?type=vm plus this node's task list. That list has VMs (type qemu)
and LXC containers (type lxc) alike; a guest's config comes from /nodes/{node}/qemu|lxc/{vmid}/config.
A guest's config (smbios1 UUID, netN NICs) is fetched only when the guest is new, when its line in
/cluster/resources changed (node, status, lock, name, sizes), when a task on this node touched it
(qmstart, qmconfig, qmigrate...), or when this node's copy is older than `config_refresh` seconds
(catches a synchronous config PUT, the one change that leaves no trace in either list). So an
unchanged cycle is 2 requests, not O(VMs).

The cache is also kept on disk in the state folder, so a short-lived `vtap hook` or `vtap vm list`
does not fetch every config again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

from vtap_core.errors import NotFound, TemporaryError, ValidationError
from vtap_core.model import VM, Nic, check_mac, parse_uuid

log = logging.getLogger("vtap.proxmox")

NET_KEY = re.compile(r"^net(\d+)$")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci", "pcnet", "i82551", "i82557b", "i82559er", "ne2k_isa")
# The fields of a /cluster/resources line whose change means "fetch the config again".
SIGNATURE = ("node", "status", "lock", "name", "template", "maxmem", "maxdisk", "maxcpu", "tags", "pool")
CONFIG_REFRESH = 600.0
CACHE_FILE = "proxmox-inventory.json"
KINDS = ("qemu", "lxc")
# Host-side device of guest NIC netN: qemu-server's tap<vmid>i<N>, pve-container's veth<vmid>i<N>.
DEVICE_PREFIX = {"qemu": "tap", "lxc": "veth"}


@dataclass(frozen=True)
class PveNic:
    index: int
    mac: str | None
    model: str | None = None
    bridge: str | None = None
    tag: int | None = None
    firewall: bool = False

    @property
    def key(self) -> str:
        return f"net{self.index}"


@dataclass(frozen=True)
class PveVm:
    vmid: int
    name: str
    node: str
    status: str
    lock: str | None = None
    uuid: str | None = None  # from smbios1; None: addressable by vmid only (always so for a container)
    nics: tuple = ()
    template: bool = False
    kind: str = "qemu"  # or "lxc": a container
    tags: tuple = ()  # PVE tags (stored ';'-separated, lower case)
    pool: str | None = None

    @property
    def identity(self) -> str:
        """What bindings follow: the UUID, else the vmid."""
        return self.uuid or str(self.vmid)

    @property
    def running(self) -> bool:
        return self.status == "running"

    def device(self, nic: PveNic) -> str:
        """The host-side device PVE makes for netN: tap<vmid>i<N> (VM), veth<vmid>i<N> (container)."""
        return f"{DEVICE_PREFIX[self.kind]}{self.vmid}i{nic.index}"

    def to_model(self) -> VM:
        nics = tuple(
            Nic(mac=n.mac or "", device=self.device(n), network=n.bridge,
                details={"nic": n.key, "model": n.model, "tag": n.tag, "firewall": n.firewall})
            for n in self.nics
        )
        details = {"vmid": self.vmid, "type": self.kind, "lock": self.lock}
        if self.kind == "lxc":
            details["warning"] = "container: no UUID, its identity is the vmid"
        elif not self.uuid:
            details["warning"] = "no smbios1 UUID: addressable by vmid only"
        return VM(uuid=self.uuid or "", name=self.name, state=self.status, host=self.node, nics=nics, details=details, tags=self.tags, pool=self.pool)


def parse_net(index: int, value: str) -> PveNic:
    """netN as PVE writes it: 'virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=10' (VM),
    'name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth' (container)."""
    fields = {}
    mac = model = None
    for part in str(value).split(","):
        key, _, val = part.partition("=")
        if key in NIC_MODELS:
            model, mac = key, val or None
        elif key == "model":
            model = val
        else:
            fields[key] = val
    mac = mac or fields.get("macaddr") or fields.get("hwaddr")
    try:
        mac = check_mac(f"net{index}", mac) if mac else None
    except ValidationError:
        mac = None
    tag = fields.get("tag")
    return PveNic(index=index, mac=mac, model=model, bridge=fields.get("bridge"),
                  tag=int(tag) if tag and tag.isdigit() else None, firewall=fields.get("firewall") == "1")


def parse_smbios_uuid(value) -> str | None:
    for part in str(value or "").split(","):
        key, _, val = part.partition("=")
        if key == "uuid":
            return parse_uuid(val)
    return None


def vm_from(resource: dict, config: dict) -> PveVm:
    nics = sorted((parse_net(int(m.group(1)), v) for k, v in config.items() if (m := NET_KEY.match(k))), key=lambda n: n.index)
    kind = resource.get("type", "qemu")
    return PveVm(
        vmid=int(resource["vmid"]),
        name=str(resource.get("name") or config.get("name") or config.get("hostname") or f"VM {resource['vmid']}"),
        node=resource["node"],
        status=resource.get("status", "unknown"),
        lock=resource.get("lock"),
        uuid=parse_smbios_uuid(config.get("smbios1")) if kind == "qemu" else None,
        nics=tuple(nics),
        template=bool(resource.get("template")),
        kind=kind,
        tags=parse_tags(resource.get("tags") or config.get("tags")),
        pool=resource.get("pool") or None,
    )


def parse_tags(value) -> tuple[str, ...]:
    """PVE keeps tags as 'a;b' (and accepts ',' or spaces between them when they are set)."""
    return tuple(dict.fromkeys(t for t in re.split(r"[;, ]+", str(value or "")) if t))


class Inventory:
    """The cluster's VMs with their configs, refreshed by poll()."""

    def __init__(self, api, node: str, state_dir: str | None = None, config_refresh: float = CONFIG_REFRESH):
        self.api = api
        self.node = node
        self.config_refresh = config_refresh
        self.cache_path = os.path.join(state_dir, CACHE_FILE) if state_dir else None
        # vmid -> {"sig": [...], "config": {...}, "fetched": epoch}
        self.entries: dict[int, dict] = {}
        self.resources: dict[int, dict] = {}
        self.polled_at: float | None = None
        self.tasks_since: int | None = None
        self.seen_tasks: set[str] = set()
        self.warned: set[int] = set()
        self._load_cache()

    # --------------------------------------------------------------- reads

    def vms(self) -> list[PveVm]:
        out = []
        for vmid, resource in sorted(self.resources.items()):
            entry = self.entries.get(vmid)
            out.append(vm_from(resource, entry["config"] if entry else {}))
        return out

    def vm(self, vmid: int) -> PveVm | None:
        resource = self.resources.get(vmid)
        if resource is None:
            return None
        entry = self.entries.get(vmid)
        return vm_from(resource, entry["config"] if entry else {})

    # ---------------------------------------------------------------- poll

    def poll(self, force=frozenset(), tasks: bool = True) -> set[int]:
        """Read the cluster again; returns the vmids that appeared, left, or changed.

        force: vmids whose config is read again whatever the lists say (a hookscript's own VM).
        """
        started = time.time()
        lines = self.api.get("cluster/resources", type="vm")
        resources = {int(r["vmid"]): r for r in lines if r.get("type") in KINDS}
        touched = self._touched_by_tasks() if tasks else set()
        changed = set(self.resources) ^ set(resources)
        for vmid, resource in resources.items():
            sig = [resource.get(k) for k in SIGNATURE]
            entry = self.entries.get(vmid)
            stale = (entry is not None and resource["node"] == self.node
                     and self.config_refresh and started - entry["fetched"] > self.config_refresh)
            if entry is None or entry["sig"] != sig or vmid in touched or vmid in force or stale:
                if self._fetch_config(vmid, resource, sig):
                    changed.add(vmid)
        for vmid in set(self.entries) - set(resources):
            del self.entries[vmid]
        self.resources = resources
        self.polled_at = started
        if changed:
            self._warn_without_uuid()
            self._save_cache()
        return changed

    def _touched_by_tasks(self) -> set[int]:
        """vmids of this node's tasks since the last poll (started or finished since then)."""
        now = int(time.time())
        since = self.tasks_since if self.tasks_since is not None else now
        tasks = self.api.get(f"nodes/{self.node}/tasks", source="all", since=max(since - 5, 0), limit=500)
        self.tasks_since = now
        touched = set()
        for task in tasks:
            key = f"{task.get('upid')}:{task.get('status', 'running')}"
            if key in self.seen_tasks or int(task.get("endtime") or task.get("starttime") or 0) < since - 5:
                continue
            self.seen_tasks.add(key)
            if str(task.get("id", "")).isdigit():
                touched.add(int(task["id"]))
        if len(self.seen_tasks) > 5000:
            self.seen_tasks.clear()
        return touched

    def _fetch_config(self, vmid: int, resource: dict, sig: list) -> bool:
        if resource.get("status") == "unknown":
            return False  # its node is offline: keep what we knew
        try:
            config = self.api.get(f"nodes/{resource['node']}/{resource.get('type', 'qemu')}/{vmid}/config")
        except (TemporaryError, NotFound) as exc:
            # Moved between the two requests, or its node is busy: try again next poll.
            log.debug("config of VM %s not read now: %s", vmid, exc)
            if vmid in self.entries:
                self.entries[vmid]["sig"] = None
            return False
        old = self.entries.get(vmid)
        self.entries[vmid] = {"sig": sig, "config": config, "fetched": time.time()}
        return old is None or old["config"] != config or old["sig"] != sig

    def _warn_without_uuid(self):
        for vmid, entry in self.entries.items():
            if self.resources.get(vmid, {}).get("type") == "lxc":
                continue  # a container never has one: `vm list` says so
            if vmid not in self.warned and not parse_smbios_uuid(entry["config"].get("smbios1")):
                self.warned.add(vmid)
                log.warning("VM %s has no smbios1 UUID: address it by vmid (%s)", vmid, vmid)

    # --------------------------------------------------------- disk cache

    def _load_cache(self):
        if not self.cache_path or not os.path.exists(self.cache_path):
            return
        try:
            with open(self.cache_path) as handle:
                data = json.load(handle)
            if data.get("url") == self.api.url:
                self.entries = {int(k): v for k, v in data.get("vms", {}).items()}
        except (OSError, ValueError, AttributeError):
            self.entries = {}  # a damaged cache only costs one full fetch

    def _save_cache(self):
        if not self.cache_path:
            return
        tmp = f"{self.cache_path}.{os.getpid()}.tmp"
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                json.dump({"url": self.api.url, "vms": self.entries}, handle)
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            log.debug("inventory cache not saved: %s", exc)
