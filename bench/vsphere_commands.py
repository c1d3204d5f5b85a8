#!/usr/bin/env python3
"""`vtap flow add` against one vCenter on an etcd store, with an elected follower leading and with none.

    python3 bench/vsphere_commands.py [--rounds 5]

With a leader, the command only writes the store and waits for the leader's report (the leader's
store watch applies the change); with none, the command is elected for its run, applies fenced and
resigns. Each round runs the CLI as a separate process and measures its wall time (it returns once
the change is in vCenter and reported) and checks that the new VspanSession source is there,
read back through pyVmomi. Also prints which process made the vspan changes (the simulator's
request log): only the leader's in the first part, only the command's in the second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vsphere"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import benchlib  # noqa: E402
from etcd_member import Etcd  # noqa: E402
from vcenter import Vcenter  # noqa: E402
from vcsim_simulator import Simulator  # noqa: E402

PREFIX = "vtap/bench"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        sys.exit("needs etcd (scripts/setup --test installs etcd-server)")
    from vtap_core.stores import open_store

    tmp = tempfile.mkdtemp(prefix="vtap-bench-commands-")
    etcd = Etcd(os.path.join(tmp, "etcd"))
    etcd.start()
    url = etcd.url(PREFIX)
    follower = None
    results = {}
    senders = {}
    try:
        log = os.path.join(tmp, "requests.jsonl")
        with Simulator(hosts=3, vms=2 * args.rounds + 2, request_log=log) as sim:
            vc = Vcenter(sim.connect())
            vms = vc.vms()

            def env(host):
                environment = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
                environment.update({"VTAP_STORE": url, "VTAP_HOST": host, "VTAP_VSPHERE_URL": sim.url,
                                    "VTAP_VSPHERE_USER": sim.user, "VTAP_VSPHERE_PASSWORD": sim.password})
                return environment

            def vtap(host, *command):
                full = [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--state", os.path.join(tmp, host, "state.db"), *command]
                return subprocess.run(full, capture_output=True, text=True, env=env(host), timeout=120, check=True)

            def mirrored():
                found = vc.sessions().get("vtap:web")
                ports = (found.sourcePortTransmitted, found.sourcePortReceived) if found else ()
                return {key for side in ports if side for key in side.portKey or ()}

            def who_sent(since):
                with open(log) as handle:
                    lines = handle.read().splitlines()[since:]
                agents = [json.loads(line)["userAgent"] for line in lines]
                return sorted({a[a.index("(") + 1:a.index(";")] for a in agents if a.startswith("vtap/")}), len(lines)

            def lines():
                with open(log) as handle:
                    return len(handle.read().splitlines())

            store = open_store(url, "vsphere", os.path.join(tmp, "bench", "state.db"))
            vtap("admin", "session", "create", "web", "--to", f"vm:{vms[-1].config.instanceUuid}")
            for part in ("leader", "no_leader"):
                if part == "leader":
                    follower = subprocess.Popen(
                        [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--state", os.path.join(tmp, "f1", "state.db"),
                         "follow", "--interval", "300"], env=env("f1"), stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "f1.log"), "ab"))
                    while not store.leaders():
                        time.sleep(0.1)
                    time.sleep(1.0)  # its first resync done
                else:
                    follower.terminate()
                    follower.wait()
                start = lines()
                walls, outputs = [], []
                for n in range(args.rounds):
                    vm = vms[n if part == "leader" else args.rounds + n]
                    t0 = time.monotonic()
                    done = vtap("admin", "flow", "add", "web", "--vm", vm.config.instanceUuid, "--name", f"{part}-{n}")
                    walls.append(round(time.monotonic() - t0, 3))
                    outputs.append(done.stdout.strip())
                    if vc.port_key(vm) not in mirrored():
                        raise RuntimeError(f"{part}-{n} is not in vCenter after the command returned: {done.stdout}")
                    print(f"{part:9} {walls[-1]:.2f} s  {done.stdout.strip()}", flush=True)
                senders[part], _ = who_sent(start)
                results[part] = {"rounds": args.rounds, "wall_s_median": benchlib.median(walls), "wall_s_max": max(walls),
                                 "wall_s": walls, "vspan_changes_by": senders[part], "last_output": outputs[-1]}
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        etcd.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    data = {"environment": benchlib.environment(), **results}
    text = "\n".join([
        "`vtap flow add` (a separate process) until it returns with the mirror in vCenter; vspan changes by (request log)",
        *(f"{part:9}: median {r['wall_s_median']} s, max {r['wall_s_max']} s; vspan changes by {', '.join(r['vspan_changes_by'])}; e.g. {r['last_output']}"
          for part, r in results.items()),
    ])
    print(text)
    benchlib.save("vsphere_commands", data, text)


if __name__ == "__main__":
    main()
