#!/usr/bin/env python3
"""Benchmark: the hookscript's post-start, as PVE runs it (`<snippet> <vmid> post-start`).

    python3 bench/proxmox_hook.py [--rounds 20]

On a live migration's target, post-start runs inside `qm start`: its time is added to the switch-over.
The node is played as a network namespace with the guest's tap100i0 and a monitoring port (vtap runs
inside it, through nsenter, as on a real node: no netns setting); the desired
state is published by `vtap flow add` through a fake PVE API (fakepve), then the API is made
unreachable for the hook (any request would fail: the figures are of the no-API path). Each round
takes the guest's taps away (pre-stop) and times post-start end to end: shell snippet, Python start,
vtap imports, reading the document, one netlink dump, the tc filters. Also timed: a bare `python -c
pass`, the floor any Python hook pays. Target: post-start <= 200 ms. Needs root and fakepve.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

UNREACHABLE = "https://127.0.0.1:1"


def fake_cluster(folder):
    from fakepve import FakePve
    from fakepve.certs import make_cert

    cafile, key, _ = make_cert(folder, hosts=("127.0.0.1",))
    pve = FakePve(host="127.0.0.1", port=0)
    pve.time_scale = 0
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(pve.start(cafile, key), loop).result(60)
    pve.add_vm(100, "web", node="pve1", status="stopped",
               config={"net0": "virtio=BC:24:11:00:01:00,bridge=vmbr0", "smbios1": f"uuid={uuid.uuid5(uuid.NAMESPACE_DNS, 'vm100')}"})
    return pve, cafile


def timed(command, env) -> tuple[float, subprocess.CompletedProcess, float]:
    """(wall seconds, result, CPU seconds of the processes it ran: less sensitive to a busy machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return took, result, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    from vtap_drivers.proxmox.hook import snippet_text

    ns = f"vtapbhook{os.getpid()}"
    with tempfile.TemporaryDirectory() as folder:
        pve, cafile = fake_cluster(folder)
        benchlib.new_netns(ns)
        try:
            for a, b in (("tap100i0", "vm100i0"), ("mon0", "mon0p")):
                benchlib.run("ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
                benchlib.run("ip", "-n", ns, "link", "set", a, "up")
                benchlib.run("ip", "-n", ns, "link", "set", b, "up")
            vtap = os.path.join(folder, "bin", "vtap")
            os.makedirs(os.path.dirname(vtap))
            with open(vtap, "w") as handle:
                handle.write(f"#!/bin/sh\nexec {sys.executable} -m vtap_cli.main \"$@\"\n")
            snippet = os.path.join(folder, "vtap-hook.sh")
            with open(snippet, "w") as handle:
                handle.write(snippet_text(vtap, strict=False))
            for path in (vtap, snippet):
                os.chmod(path, 0o755)
            config = os.path.join(folder, "config.toml")
            open(config, "w").close()
            env = dict(os.environ, PATH=f"{os.path.dirname(vtap)}:{os.environ['PATH']}", VTAP_CONFIG=config, VTAP_DRIVER="proxmox",
                       VTAP_STATE=os.path.join(folder, "state", "state.db"), VTAP_PROXMOX_URL=pve.url, VTAP_PROXMOX_USER="root@pam",
                       VTAP_PROXMOX_PASSWORD="secret", VTAP_PROXMOX_CAFILE=cafile, VTAP_PROXMOX_NODE="pve1",
                       VTAP_PROXMOX_SHARED_STATE=os.path.join(folder, "pmxcfs", "vtap", "desired.json"))
            inside = ["nsenter", f"--net=/run/netns/{ns}"]
            for command in (("session", "create", "web", "--to", "port:mon0"), ("flow", "add", "web", "--vm", "100", "--direction", "both")):
                benchlib.run(vtap, *command, env=env)  # the API is on this side; VM 100 is stopped: only published
            # As installed (pip writes .pyc files): bytecode cached, here under a prefix of the temp folder.
            offline = dict(env, VTAP_PROXMOX_URL=UNREACHABLE, PYTHONPYCACHEPREFIX=os.path.join(folder, "pycache"))
            offline.pop("PYTHONDONTWRITEBYTECODE", None)
            post_start, floor, cpu, floor_cpu = [], [], [], []
            for _ in range(args.rounds):
                benchlib.run(*inside, snippet, "100", "pre-stop", env=offline)
                took, result, used = timed([*inside, snippet, "100", "post-start"], offline)
                if "2 applied" not in result.stderr:
                    raise RuntimeError(f"post-start did not apply the taps: {result.stderr}")
                post_start.append(took)
                cpu.append(used)
                took, _, used = timed([*inside, sys.executable, "-c", "pass"], offline)
                floor.append(took)
                floor_cpu.append(used)
        finally:
            benchlib.delete_netns(ns)
    post_start.sort()
    figures = {
        "rounds": args.rounds,
        "post_start_ms": {"median": round(benchlib.median(post_start) * 1000, 1), "p90": round(post_start[int(0.9 * (len(post_start) - 1))] * 1000, 1),
                          "max": round(post_start[-1] * 1000, 1), "min": round(post_start[0] * 1000, 1)},
        "post_start_cpu_ms_median": round(benchlib.median(cpu) * 1000, 1),
        "python_start_ms_median": round(benchlib.median(floor) * 1000, 1),
        "python_start_cpu_ms_median": round(benchlib.median(floor_cpu) * 1000, 1),
        "api_requests": "none possible: the API URL was unreachable during the hook",
        "target_ms": 200,
        "environment": benchlib.environment(),
    }
    p = figures["post_start_ms"]
    text = (f"proxmox hookscript post-start (snippet -> vtap -> 2 tc filters on tap100i0), {args.rounds} rounds, no API:\n"
            f"  median {p['median']} ms, p90 {p['p90']} ms, min {p['min']} ms, max {p['max']} ms (target <= 200 ms)\n"
            f"  CPU time (user+sys of every process it ran): median {figures['post_start_cpu_ms_median']} ms\n"
            f"  a bare `python -c pass`: {figures['python_start_ms_median']} ms wall, {figures['python_start_cpu_ms_median']} ms CPU\n"
            f"  load average at start: {figures['environment']['loadavg_at_start'][0]:.1f} on {figures['environment']['cpus']} CPUs")
    print(text)
    benchlib.save("proxmox_hook", figures, text)


if __name__ == "__main__":
    main()
