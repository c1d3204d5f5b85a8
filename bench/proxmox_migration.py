"""Part of bench/proxmox_agent.py: from a migration's completion to the tap active on the destination.

Two nodes are played as network namespaces with tap devices, each with its own agent (in threads,
polling every `interval`); one VM of the big fake cluster migrates back and forth between them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
import uuid

from vtap_core.client import Client
from vtap_drivers.proxmox.agent import Agent
from vtap_drivers.proxmox.desired import DesiredState
from vtap_drivers.proxmox.driver import ProxmoxDriver

ROUNDS = 10


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def has_mirror(ns, device):
    return "mirred" in subprocess.run(["tc", "-n", ns, "filter", "show", "dev", device, "ingress"], capture_output=True, text=True).stdout


def migration_figures(fake, folder, interval):
    tag = uuid.uuid4().hex[:6]
    namespaces = {node: f"vtbench-{tag}-{node}" for node in ("pve1", "pve2")}
    vm = next(v for v in fake.pve.vms if v.node == "pve1")
    tap = f"tap{vm.vmid}i0"
    shared = os.path.join(folder, "pmxcfs", "desired.json")
    stop = threading.Event()
    threads, drivers = [], []
    try:
        for node, ns in namespaces.items():
            sh("ip", "netns", "add", ns)
            _veth(ns, "mon0")
        _veth(namespaces["pve1"], tap)
        settings = {node: dict(url=fake.pve.url, user="root@pam", password="secret", cafile=fake.cafile, node=node,
                               netns=ns, shared_state=shared) for node, ns in namespaces.items()}
        with Client(driver="proxmox", state=os.path.join(folder, "pve1", "state.db"), **settings["pve1"]) as client:
            client.create_session("bench", to="port:mon0")
            client.add_flow("bench", vm=str(vm.vmid), direction="out")
        agents = {}
        for node in namespaces:
            state_dir = os.path.join(folder, node)
            os.makedirs(state_dir, exist_ok=True)
            driver = ProxmoxDriver(state_dir=state_dir, **settings[node])
            drivers.append(driver)
            agents[node] = Agent(driver, DesiredState(shared, state_dir), interval=interval)
        agents["pve2"].cycle()  # its first cycle reads every VM config: not part of a migration
        cycle = _timed_cycles(agents["pve1"])
        for agent in agents.values():
            thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
            thread.start()
            threads.append(thread)
        applied, removed = [], []
        source, destination = "pve1", "pve2"
        for _ in range(ROUNDS):
            src_ns, dst_ns = namespaces[source], namespaces[destination]
            _veth(dst_ns, tap)
            fake.call(fake.pve.migrate(vm.vmid, destination))
            done = time.monotonic()
            on_destination = on_source = None
            while on_destination is None or on_source is None:
                now = time.monotonic()
                if on_destination is None and has_mirror(dst_ns, tap):
                    on_destination = now - done
                if on_source is None and not has_mirror(src_ns, tap):
                    on_source = now - done
                if now - done > 10 * interval + 10:
                    raise RuntimeError("the tap did not follow the VM")
                time.sleep(0.005)
            sh("ip", "-n", src_ns, "link", "del", tap)
            applied.append(on_destination)
            removed.append(on_source)
            source, destination = destination, source
        return {
            "interval_seconds": interval,
            "rounds": ROUNDS,
            "tap_active_on_destination_seconds": _summary(applied),
            "tap_removed_on_source_seconds": _summary(removed),
            "worst_in_intervals": round(max(applied) / interval, 2),
            "target_max_intervals": 2,
            "full_agent_cycle_unchanged_seconds": cycle,
        }
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for driver in drivers:
            driver.close()
        for ns in namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _veth(ns, name):
    """A device named `name` (a veth; its peer plays the VM's NIC or the monitoring tool)."""
    sh("ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", "p" + name[:14])
    sh("ip", "-n", ns, "link", "set", name, "up")


def _timed_cycles(agent, count=5):
    """Wall time of a whole agent cycle (poll, desired state, reconcile) when nothing changed."""
    agent.cycle()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        agent.cycle()
        times.append(time.perf_counter() - started)
    return {"median": round(statistics.median(times), 4), "max": round(max(times), 4)}


def _summary(values):
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}
