#!/usr/bin/env python3
"""Leader takeover among `vtap follow` processes of one vCenter (etcd store, the extended govmomi simulator).

    python3 bench/vsphere_election.py [--followers 3] [--kills 5] [--leader-ttl 5]

Each round kills the leader with SIGKILL, at once writes a change to the desired state (one more
flow), and measures from the kill to: a new leader's key in etcd, and the change realized in
vCenter (the new VspanSession source read back through pyVmomi). The killed follower is started
again as a standby. Then the same with SIGTERM (a clean stop revokes the lease: no TTL to wait).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vsphere"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "functional", "fleet"))
import benchlib  # noqa: E402
from etcd_member import Etcd  # noqa: E402
from fleetlib import desire, wait_for as poll  # noqa: E402
from vcenter import Vcenter  # noqa: E402
from vcsim_simulator import Simulator  # noqa: E402

PREFIX = "vtap/bench"


def wait_for(predicate, seconds=30.0, step=0.05):
    """fleetlib's wait_for, but a timeout ends the benchmark."""
    value = poll(predicate, seconds, step)
    if not value:
        raise RuntimeError("timed out")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--terms", type=int, default=2, help="clean stops (SIGTERM) after the kills")
    parser.add_argument("--leader-ttl", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        sys.exit("needs etcd (scripts/setup --test installs etcd-server)")
    from vtap_core.stores import open_store

    rounds = args.kills + args.terms
    tmp = tempfile.mkdtemp(prefix="vtap-bench-election-")
    etcd = Etcd(os.path.join(tmp, "etcd"))
    etcd.start()
    url = etcd.url(PREFIX)
    followers = {}
    try:
        with Simulator(hosts=3, vms=rounds + 3) as sim:
            vc = Vcenter(sim.connect())
            vms = [vm.config.instanceUuid for vm in vc.vms()]
            store = open_store(url, "vsphere", os.path.join(tmp, "bench", "state.db"))

            def env(host):
                environment = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
                environment.update({"VTAP_STORE": url, "VTAP_HOST": host, "VTAP_VSPHERE_URL": sim.url,
                                    "VTAP_VSPHERE_USER": sim.user, "VTAP_VSPHERE_PASSWORD": sim.password})
                return environment

            def start(host):
                command = [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--state", os.path.join(tmp, host, "state.db"),
                           "follow", "--interval", "300", "--leader-ttl", str(args.leader_ttl)]
                followers[host] = subprocess.Popen(command, env=env(host), stdout=subprocess.DEVNULL,
                                                   stderr=open(os.path.join(tmp, f"{host}.log"), "ab"))

            def mirrored():
                found = vc.sessions().get("vtap:web")
                ports = (found.sourcePortTransmitted, found.sourcePortReceived) if found else ()
                return {key for side in ports if side for key in side.portKey or ()}

            def leader():
                leaders = store.leaders()
                return leaders[0] if leaders else None

            for i in range(args.followers):
                start(f"f{i + 1}")
            desire(store, session={"name": "web", "to": f"vm:{vms[-1]}"}, command="bench")
            desire(store, flow={"name": "web-0", "session": "web", "vm": vms[0], "direction": "both"}, command="bench")
            wait_for(lambda: vc.port_key(vc.vm(0)) in mirrored())
            results = []
            for n in range(1, rounds + 1):
                how = signal.SIGKILL if n <= args.kills else signal.SIGTERM
                old = wait_for(leader)
                time.sleep(1.5)  # the leader settled (its lease renewed a few times)
                followers[old["host"]].send_signal(how)
                t0 = time.monotonic()
                followers[old["host"]].wait()
                desire(store, flow={"name": f"web-{n}", "session": "web", "vm": vms[n], "direction": "out"}, command="bench")
                new = wait_for(lambda: (lambda found: found if found and found["host"] != old["host"] else None)(leader()), step=0.02)
                elected = time.monotonic() - t0
                wait_for(lambda: vc.port_key(vc.vm(n)) in mirrored(), step=0.02)
                realized = time.monotonic() - t0
                results.append({"signal": how.name, "from": old["host"], "to": new["host"], "elected_s": round(elected, 3), "realized_s": round(realized, 3)})
                print(f"{how.name} {old['host']} -> {new['host']} elected after {elected:.2f} s, change realized after {realized:.2f} s", flush=True)
                start(old["host"])  # back as a standby
    finally:
        for process in followers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        etcd.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(kind):
        rows = [r for r in results if r["signal"] == kind]
        return {"rounds": len(rows), "elected_s_median": benchlib.median([r["elected_s"] for r in rows]),
                "elected_s_max": max((r["elected_s"] for r in rows), default=None),
                "realized_s_median": benchlib.median([r["realized_s"] for r in rows]),
                "realized_s_max": max((r["realized_s"] for r in rows), default=None)}

    data = {"environment": benchlib.environment(), "followers": args.followers, "leader_ttl_s": args.leader_ttl,
            "kill_9": summary("SIGKILL"), "sigterm": summary("SIGTERM"), "rounds": results}
    text = "\n".join(
        [f"{args.followers} followers, leader lease TTL {args.leader_ttl} s; time from the leader's end to a new leader / the change made after it realized in vCenter"]
        + [f"{r['signal']:8} {r['from']} -> {r['to']}: elected {r['elected_s']:.2f} s, realized {r['realized_s']:.2f} s" for r in results]
        + [f"kill -9 ({data['kill_9']['rounds']}): realized median {data['kill_9']['realized_s_median']} s, max {data['kill_9']['realized_s_max']} s",
           f"SIGTERM ({data['sigterm']['rounds']}): realized median {data['sigterm']['realized_s_median']} s, max {data['sigterm']['realized_s_max']} s"])
    print(text)
    benchlib.save("vsphere_election", data, text)
    print(json.dumps(data["kill_9"]))


if __name__ == "__main__":
    main()
