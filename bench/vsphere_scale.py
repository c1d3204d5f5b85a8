#!/usr/bin/env python3
"""vSphere at scale, against the extended govmomi simulator (tests/vsphere/vcsim).

    python3 bench/vsphere_scale.py [--hosts 50] [--vms 1000] [--sessions 100] [--migrations 10]

Measures, through the SDK a user would use (vtap_core.client.Client):
  - the time to create N sessions, one flow each (create_session + add_flow);
  - the time from RelocateVM_Task completion to the follower having verified the VM's
    session (its per-VM reconcile done), over several migrations;
  - the SOAP round trips the follower makes per migration, by method, at the full VM count
    and at a tenth of it (they must not grow with the number of VMs).
Targets (issue 4): 100 sessions <= 20 s; reaction <= 1 s; round trips constant.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vsphere"))
import benchlib  # noqa: E402
from vcsim_simulator import Simulator  # noqa: E402


class SoapCounter:
    """Counts SOAP calls per pyVmomi stub (one stub = one vCenter session)."""

    def __init__(self):
        from pyVmomi.SoapAdapter import SoapStubAdapter

        self.calls = collections.defaultdict(collections.Counter)
        original = SoapStubAdapter.InvokeMethod
        counter = self

        def counted(stub, mo, info, args, *rest, **kw):
            counter.calls[id(stub)][info.wsdlName] += 1
            return original(stub, mo, info, args, *rest, **kw)

        SoapStubAdapter.InvokeMethod = counted

    def snapshot(self, stub):
        return collections.Counter(self.calls[id(stub)])


class Reactions:
    """The follower's metrics hook: when each per-VM reconcile finished."""

    def __init__(self):
        self.done = []
        self.ready = threading.Condition()

    def observe_latency(self, seconds):
        with self.ready:
            self.done.append(time.monotonic())
            self.ready.notify_all()

    def count_reconnect(self): ...

    def count_error(self): ...

    def set_flows(self, desired, active): ...


def scenario(hosts, vms, sessions, migrations, counter, state_dir):
    from pyVmomi import vim

    from vtap_core.client import Client
    from vtap_core.follow import Follower

    result = {"hosts": hosts, "vms": vms}
    started = time.monotonic()
    with Simulator(hosts=hosts, vms=vms) as sim:
        result["simulator_start_s"] = round(time.monotonic() - started, 2)
        si = sim.connect()
        view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
        machines = sorted(view.view, key=lambda vm: vm.name)
        all_hosts = list(si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.HostSystem], True).view)
        settings = dict(url=sim.url, user=sim.user, password=sim.password)
        state = os.path.join(state_dir, f"vtap-{vms}.db")

        with Client(driver="vsphere", state=state, **settings) as client:
            tapped = machines[:sessions]
            begin = time.monotonic()
            for i, vm in enumerate(tapped):
                client.create_session(f"s{i}", to=f"gre://192.0.2.{1 + i % 250}")
                client.add_flow(f"s{i}", vm=vm.config.instanceUuid, direction="both")
            result["create_sessions"] = sessions
            result["create_sessions_s"] = round(time.monotonic() - begin, 2)
            switch = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.DistributedVirtualSwitch], True).view[0]
            result["vspan_sessions_on_switch"] = sum(1 for s in switch.config.vspanSession if s.name.startswith("vtap:"))

        reactions, stop, holder = Reactions(), threading.Event(), {}

        def follow():
            with Client(driver="vsphere", state=state, **settings) as client:
                follower = Follower(client, interval=3600, metrics=reactions)
                holder["client"], holder["follower"] = client, follower
                follower.run(stop)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        while "follower" not in holder or holder["follower"].resyncs < 1:
            time.sleep(0.05)
        time.sleep(1.5)  # the watch's first WaitForUpdatesEx (the initial state) is behind us
        stub = holder["client"].driver.connection.si._stub

        latencies, round_trips = [], []
        for n in range(migrations):
            vm = tapped[(n * 7) % len(tapped)]
            destination = next(h for h in all_hosts if h != vm.runtime.host)
            seen = len(reactions.done)
            before = counter.snapshot(stub)
            task = vm.RelocateVM_Task(vim.vm.RelocateSpec(host=destination))
            while task.info.state not in ("success", "error"):
                time.sleep(0.005)
            completed = time.monotonic()
            with reactions.ready:
                reactions.ready.wait_for(lambda: len(reactions.done) > seen, timeout=30)
            if len(reactions.done) > seen:
                latencies.append(reactions.done[seen] - completed)
            time.sleep(0.3)  # let the reconcile's last call land before counting
            calls = counter.snapshot(stub) - before
            # The watch's WaitForUpdatesEx is always in flight (and returns empty every second
            # when idle): count exactly one for the answer that carried the migration.
            calls["WaitForUpdatesEx"] = 1
            round_trips.append(dict(calls))
            time.sleep(0.2)
        stop.set()
        thread.join(timeout=15)
        totals = [sum(c.values()) for c in round_trips]
        result["migrations"] = migrations
        result["reaction_s"] = {"median": round(benchlib.median(latencies), 3), "max": round(max(latencies), 3), "all": [round(x, 3) for x in latencies]}
        result["round_trips_per_migration"] = {"median": benchlib.median(totals), "max": max(totals), "by_method_first": round_trips[0]}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--migrations", type=int, default=10)
    args = parser.parse_args()
    counter = SoapCounter()
    data = {"environment": benchlib.environment(), "runs": []}
    lines = []
    with tempfile.TemporaryDirectory(prefix="vtap-bench-vsphere-") as state_dir:
        for hosts, vms in ((max(2, args.hosts // 10), max(args.sessions, args.vms // 10)), (args.hosts, args.vms)):
            run = scenario(hosts, vms, args.sessions, args.migrations, counter, state_dir)
            data["runs"].append(run)
            lines.append(
                f"{vms} VMs on {hosts} hosts: simulator up in {run['simulator_start_s']} s; "
                f"{run['create_sessions']} sessions created in {run['create_sessions_s']} s "
                f"({run['vspan_sessions_on_switch']} vtap VspanSessions on the switch); "
                f"RelocateVM_Task done -> follower verified: median {run['reaction_s']['median']} s, max {run['reaction_s']['max']} s; "
                f"SOAP round trips per migration: median {run['round_trips_per_migration']['median']}, "
                f"max {run['round_trips_per_migration']['max']} {run['round_trips_per_migration']['by_method_first']}"
            )
            print(lines[-1], flush=True)
    benchlib.save("vsphere_scale", data, "\n".join(lines))


if __name__ == "__main__":
    main()
