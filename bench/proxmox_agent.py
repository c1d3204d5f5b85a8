#!/usr/bin/env python3
"""Benchmark: what one proxmox agent cycle costs on a 500-VM, 5-node cluster (fakepve), and how soon a
migrated VM's tap is active on its new node.

    python3 bench/proxmox_agent.py [--vms 500] [--nodes 5] [--interval 1.0]

Prints the figures and writes them to bench/results/proxmox_agent.json. Needs fakepve (scripts/setup
--test); the migration part needs root (it plays the destination node as a network namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid

from fakepve import FakePve
from fakepve.certs import make_cert

from vtap_drivers.proxmox.api import PveApi
from vtap_drivers.proxmox.inventory import Inventory

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "proxmox_agent.json")


class Fake:
    def __init__(self, folder):
        self.cafile, key, _ = make_cert(folder, hosts=("127.0.0.1",))
        self.pve = FakePve(host="127.0.0.1", port=0)
        self.pve.time_scale = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.call(self.pve.start(self.cafile, key))

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def api(self):
        return PveApi(url=self.pve.url, user="root@pam", password="secret", cafile=self.cafile)


def populate(fake, vms, nodes):
    for i in range(vms):
        vmid = 1000 + i
        config = {"net0": f"virtio=BC:24:11:{i >> 8 & 255:02X}:{i & 255:02X}:00,bridge=vmbr0",
                  "smbios1": f"uuid={uuid.uuid5(uuid.NAMESPACE_DNS, str(vmid))}"}
        fake.pve.add_vm(vmid, f"vm{vmid}", node=f"pve{i % nodes + 1}", status="running", config=config)


def timed_poll(inventory):
    before = inventory.api.calls
    started = time.perf_counter()
    changed = inventory.poll()
    return inventory.api.calls - before, time.perf_counter() - started, len(changed)


def inventory_figures(fake, nodes):
    inventory = Inventory(fake.api(), "pve1")
    first = timed_poll(inventory)
    unchanged = [timed_poll(inventory) for _ in range(10)]
    movers = [vm.vmid for vm in fake.pve.vms if vm.node != "pve1"][:10]
    for vmid in movers:
        fake.call(fake.pve.migrate(vmid, "pve1"))
    moved = timed_poll(inventory)
    after = timed_poll(inventory)
    return {
        "first_cycle": {"api_calls": first[0], "seconds": round(first[1], 4)},
        "unchanged_cycle": {"api_calls": unchanged[-1][0], "seconds_median": round(statistics.median(u[1] for u in unchanged), 4)},
        "cycle_after_10_moved": {"api_calls": moved[0], "seconds": round(moved[1], 4), "vms_changed": moved[2]},
        "next_unchanged_cycle": {"api_calls": after[0], "seconds": round(after[1], 4)},
        "target_unchanged_calls_max": 1 + nodes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0, help="agent polling interval for the migration part")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="vtap-bench-pve-")
    fake = Fake(folder)
    populate(fake, args.vms, args.nodes)
    results = {"vms": args.vms, "nodes": args.nodes, "agent_cycle_node_pve1": inventory_figures(fake, args.nodes)}
    if os.geteuid() == 0:
        from proxmox_migration import migration_figures

        results["migration_to_tap_active"] = migration_figures(fake, folder, args.interval)
    else:
        results["migration_to_tap_active"] = "skipped: needs root (network namespaces)"
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
    print(f"written to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
