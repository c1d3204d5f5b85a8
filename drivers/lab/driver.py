"""The `lab` driver: VMs of the namespace lab (topology.py), mirrored with the Linux tc dataplane.

It is the kvm driver's shape without libvirt: inventory comes from the marks
on the host-side devices, each lab host is one TcDataplane (one network
namespace), and a VM that moves shows up as a hint from watch(). The same
core, store, reconcile and dataplane run underneath as for every driver.
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator

from vtap_core.driver import Binding, Description, Driver, Features
from vtap_core.errors import NotFound, ValidationError
from vtap_core.model import VM, Nic, TapFlow, TapSession
from vtap_drivers.lab.topology import Lab

FEATURES = Features(
    targets=frozenset({"port", "vxlan", "pcap", "gre", "erspan"}),  # gre, erspan: where the kernel has the devices
    sources=frozenset({"vm"}),
    filter=True,
    sample=True,
    snaplen_targets=frozenset({"pcap"}),
    selector_keys=frozenset({"name", "host", "network"}),
)
WATCH_POLL = 0.1  # seconds: the lab has no event bus, so it looks often (cheap: two netlink dumps)


class LabDriver(Driver):
    name = "lab"

    def __init__(self, state_dir: str = ".", prefix: str = "vtapdemo", **options):
        super().__init__(state_dir=state_dir, prefix=prefix, **options)
        self.lab = Lab(prefix)
        self.state_dir = state_dir
        self._dataplanes = {}

    def dataplane(self, host: str):
        if host not in self._dataplanes:
            from vtap_drivers.linux.dataplane import TcDataplane

            self._dataplanes[host] = TcDataplane(netns=self.lab.ns(host), state_dir=self.state_dir)
        return self._dataplanes[host]

    def describe(self) -> Description:
        return Description(self.name, "a lab of network namespaces playing hosts and VMs", FEATURES, {"prefix": self.lab.prefix})

    def inventory(self) -> list[VM]:
        return [
            VM(uuid=vm["uuid"], name=vm["name"], state="running", host=vm["host"], nics=(Nic(vm["mac"], vm["device"], "br0"),))
            for vm in self.lab.vms()
        ]

    def plan(self, sessions: Iterable[TapSession], flows: Iterable[TapFlow]) -> list[Binding]:
        from vtap_drivers.linux.dataplane import unique

        if not self.lab.exists():
            raise NotFound(f"no lab with prefix {self.lab.prefix!r} (vtap demo --keep builds one)")
        vms = self.inventory()
        flows = list(flows)
        bindings: list[Binding] = []
        for session in sessions:
            self.check_features(session, [f for f in flows if f.session == session.name])
            for flow in (f for f in flows if f.session == session.name):
                for vm, nic in self._resolve(flow, vms):
                    bindings.extend(self.dataplane(vm.host).plan_vm_device(session, flow, nic.device, vm=vm.uuid))
        return unique(bindings)

    def _resolve(self, flow: TapFlow, vms: list[VM]):
        wanted = flow.source.vm
        matches = [vm for vm in vms if wanted in (vm.uuid, vm.name)]
        if not matches:
            raise NotFound(f"vm {wanted}: no such VM in the lab")
        vm = matches[0]
        nics = [nic for nic in vm.nics if flow.source.nic in (None, nic.mac)]
        if not nics:
            raise ValidationError("nic", f"{flow.source.nic} is not a NIC of vm {vm.name}")
        return [(vm, nic) for nic in nics]

    def observe(self) -> list[Binding]:
        return [binding for host in self.lab.host_namespaces for binding in self.dataplane(host).observe()]

    def _by_host(self, bindings: Iterable[Binding]) -> dict:
        groups: dict = {}
        hosts = {namespace: host for host, namespace in self.lab.host_namespaces.items()}
        for binding in bindings:
            namespace = binding.key.split("/")[1]
            groups.setdefault(hosts[namespace], []).append(binding)
        return groups

    def prepare(self, bindings: Iterable[Binding]) -> None:
        for host, group in self._by_host(bindings).items():
            self.dataplane(host).prepare(group)

    def apply(self, bindings: Iterable[Binding]) -> None:
        for host, group in self._by_host(bindings).items():
            self.dataplane(host).apply(group)

    def remove(self, bindings: Iterable[Binding]) -> None:
        for host, group in self._by_host(bindings).items():
            self.dataplane(host).remove(group)

    def watch(self, stop: threading.Event) -> Iterator[str | None]:
        """The UUID of every VM whose host or device changed since the last look."""
        seen = {vm["uuid"]: (vm["host"], vm["device"]) for vm in self.lab.vms()}
        while not stop.wait(WATCH_POLL):
            now = {vm["uuid"]: (vm["host"], vm["device"]) for vm in self.lab.vms()}
            for uuid in set(seen) | set(now):
                if seen.get(uuid) != now.get(uuid):
                    yield uuid
            seen = now

    def close(self) -> None:
        for dataplane in self._dataplanes.values():
            dataplane.close()
        self._dataplanes.clear()
