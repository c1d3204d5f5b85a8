"""Control plane of the kvm driver at 1,000 VMs: libvirt's test driver (test:/// with a
generated node XML of N running domains, one NIC each whose host device is an ifb
device in the benchmark's own namespace), one session, one flow per VM (both ways:
2 tc filters per VM).

Measures, through the SDK as a user would: inventory, the first apply of all flows,
a full no-op resync (what the follower does at start, on reconnect and periodically),
and the peak RSS of `vtap follow --once` doing that resync in a process of its own.
Targets: resync <= 2 s, follower RSS <= 150 MiB.

    python3 bench/kvm_scale.py [--vms 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def node_xml(count: int) -> str:
    domains = []
    for i in range(count):
        domains.append(
            f"<domain type='test'><name>vm{i}</name><uuid>00000000-0000-4000-8000-{i:012d}</uuid>"
            "<memory>65536</memory><os><type>hvm</type></os><devices>"
            f"<interface type='bridge'><mac address='52:54:01:00:{i >> 8:02x}:{i & 255:02x}'/>"
            f"<source bridge='br0'/><target dev='kd{i}'/></interface></devices></domain>"
        )
    return "<node>" + "".join(domains) + "</node>"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = benchlib.environment()
    netns = benchlib.new_netns(f"vtapbkvm{os.getpid()}")
    work = tempfile.mkdtemp(prefix="vtapbkvm")
    try:
        batch = "".join(f"link add kd{i} type ifb\nlink set kd{i} up\n" for i in range(args.vms)) + "link add kdmon type ifb\nlink set kdmon up\n"
        subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True, check=True)
        benchlib.enter_netns(netns)
        path = os.path.join(work, "node.xml")
        with open(path, "w") as f:
            f.write(node_xml(args.vms))
        uri = f"test://{path}"
        state = os.path.join(work, "vtap.db")
        return run(args, env, uri, state)
    finally:
        benchlib.delete_netns(netns)


def run(args, env, uri, state) -> int:
    from vtap_core.client import Client

    figures = {"vms": args.vms, "filters": 2 * args.vms, **env}
    with Client(driver="kvm", state=state, uri=uri) as vtap:
        started = time.perf_counter()
        vms = vtap.vms()
        figures["inventory_s"] = time.perf_counter() - started
        assert len(vms) == args.vms, len(vms)
        document = {"sessions": [{"name": "scale", "to": "port:kdmon", "flows": [{"vm": vm.uuid} for vm in vms]}]}
        started = time.perf_counter()
        vtap.apply_document(document)
        figures["first_apply_s"] = time.perf_counter() - started
        resyncs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            plan = vtap.reconcile()
            resyncs.append(time.perf_counter() - started)
            assert plan.empty and len(plan.keep) == 2 * args.vms, plan.summary()
        figures["resync_s"] = resyncs
        figures["resync_median_s"] = benchlib.median(resyncs)
        figures["sdk_process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    subprocess.run(["vtap", "--driver", "kvm", "--uri", uri, "--state", state, "follow", "--once"], check=True, capture_output=True)
    figures["follow_once_wall_s"] = time.perf_counter() - started
    figures["follower_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with Client(driver="kvm", state=state, uri=uri) as vtap:
        started = time.perf_counter()
        vtap.delete_session("scale")
        figures["delete_s"] = time.perf_counter() - started

    text = "\n".join([
        f"kvm control plane, libvirt test driver, {args.vms} running VMs, {2 * args.vms} tc filters (load {env['loadavg_at_start'][0]:.1f})",
        f"  inventory                 {figures['inventory_s']:.2f} s",
        f"  first apply (all flows)   {figures['first_apply_s']:.2f} s",
        f"  full resync, no-op        {figures['resync_median_s']:.2f} s median of {args.repeats}   (target <= 2 s)",
        f"  vtap follow --once        {figures['follow_once_wall_s']:.2f} s wall, peak RSS {figures['follower_peak_rss_mib']:.0f} MiB   (target <= 150 MiB)",
        f"  delete session            {figures['delete_s']:.2f} s",
    ])
    print(text)
    benchlib.save("kvm_scale", figures, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
