#!/usr/bin/env python3
"""vSphere selector flows while `vtap follow` runs, against the extended govmomi simulator.

    python3 bench/vsphere_selectors.py [--hosts 3] [--vms 200] [--new 10] [--tags 5]

Measures, with the follower running (no periodic resync, so only its watch acts):
  - a VM created (Folder.CreateVM_Task) whose name matches `name=web-*` -> its port is a source of
    the session's VMwareVspanSession (read back from the simulator every 20 ms);
  - the same for a VM cloned (CloneVM_Task);
  - a vSphere tag attached through the vAPI to a VM selected by `tag=level:gold` -> tapped. The
    vAPI has no events: the follower reads tags every TAG_POLL (10 s), which bounds this one.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vsphere"))
import benchlib  # noqa: E402
from vapi_tags import VapiTags  # noqa: E402
from vcenter import Vcenter  # noqa: E402
from vcsim_simulator import Simulator  # noqa: E402


def mirrored(vc, name):
    session = vc.sessions().get(f"vtap:{name}")
    if session is None:
        return set()
    return set(session.sourcePortReceived.portKey or []) | set(session.sourcePortTransmitted.portKey or [])


def until_tapped(vc, session, key, timeout=60.0) -> float:
    start = time.monotonic()
    while key not in mirrored(vc, session):
        if time.monotonic() - start > timeout:
            raise SystemExit(f"port {key} not tapped after {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def summary(values):
    return {"n": len(values), "p50_ms": round(benchlib.percentile(values, 50) * 1000), "p99_ms": round(benchlib.percentile(values, 99) * 1000), "max_ms": round(max(values) * 1000)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--tags", type=int, default=8)
    args = parser.parse_args()
    from vtap_core.client import Client
    from vtap_core.follow import Follower
    from vtap_drivers.vsphere.driver import TAG_POLL

    env = benchlib.environment()
    state = os.path.join(tempfile.mkdtemp(prefix="vtapbvsel"), "s.db")
    with Simulator(hosts=args.hosts, vms=args.vms) as sim:
        vc = Vcenter(sim.connect())
        tags = VapiTags(sim)
        gold = tags.tag(tags.category("level"), "gold")

        def client():
            return Client(driver="vsphere", state=state, url=sim.url, user=sim.user, password=sim.password)

        with client() as c:
            c.create_session("web", to="gre://192.0.2.50")
            c.add_flow("web", select="name=web-*")
            c.create_session("gold", to="gre://192.0.2.51")
            c.add_flow("gold", select="tag=level:gold")
        stop = threading.Event()
        follower_box = {}

        def follow():
            with client() as c:
                follower_box["f"] = Follower(c, interval=3600)
                follower_box["f"].run(stop)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        while follower_box.get("f") is None or follower_box["f"].resyncs < 1:
            time.sleep(0.1)
        time.sleep(1.0)
        created, cloned, tagged = [], [], []
        try:
            for i in range(args.new):
                vm = vc.create_vm(f"web-new{i}")
                created.append(until_tapped(vc, "web", vc.port_key(vm)))
                clone = vc.clone_vm(vm, f"web-clone{i}")
                cloned.append(until_tapped(vc, "web", vc.port_key(clone)))
            for i in range(args.tags):
                vm = vc.vm(i)
                time.sleep(random.uniform(0, TAG_POLL))  # not in step with the follower's poll
                tags.attach(gold, vm)
                tagged.append(until_tapped(vc, "gold", vc.port_key(vm)))
        finally:
            stop.set()
            thread.join(timeout=15)
            with client() as c:
                c.delete_session("web")
                c.delete_session("gold")
    figures = {"created": summary(created), "cloned": summary(cloned), "tagged": summary(tagged), "tag_poll_s": TAG_POLL}
    lines = [
        f"vsphere selectors, simulator: {args.hosts} hosts, {args.vms} VMs (load {env['loadavg_at_start'][0]:.1f})",
        f"  VM created -> tapped (follower)      p50 {figures['created']['p50_ms']} ms, p99 {figures['created']['p99_ms']} ms over {len(created)}",
        f"  VM cloned -> tapped (follower)       p50 {figures['cloned']['p50_ms']} ms, p99 {figures['cloned']['p99_ms']} ms over {len(cloned)}",
        f"  vAPI tag attached -> tapped          p50 {figures['tagged']['p50_ms']} ms, max {figures['tagged']['max_ms']} ms over {len(tagged)}  (tags polled every {TAG_POLL:.0f} s)",
    ]
    text = "\n".join(lines)
    print(text)
    benchlib.save("vsphere_selectors", {"environment": env, "settings": vars(args), **figures}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
