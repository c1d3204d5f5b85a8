"""Live migration with a tap: frames missed and whether the tap was there before the VM resumed.

Two libvirtd "hosts" on this machine (as the tests run them:
tests/functional/kvm/kvm_lab.py), one tiny TCG guest pinging a peer on a Linux
bridge, one flow (direction out) to a monitor port. `--store file`: a `vtap
follow` per host sharing one SQLite store file. `--store etcd`: a `vtap agent`
per host, each with its own state dir, sharing nothing but one etcd (started
here; tests/functional/kvm/fleet_lab.py). The guest is migrated live back and
forth N times. For each move: the guest's frames seen where they leave the
bridge for the peer, matched by their bytes with the copies at the monitor
port (missed: frames without a copy; extra: copies beyond one), and on the
destination the time from vtap's filter appearing on the new device to
libvirt's RESUMED/MIGRATED event (positive: the tap was ready before the VM ran
there). Target: tap active before resume, 0 frames missed.
Figures: bench/results/kvm_migration.* (file), kvm_migration_etcd.* (etcd).

    python3 bench/kvm_migration.py [--moves 4] [--store file|etcd]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "functional", "kvm"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # initramfs.py (kvm_lab uses it), etcd_member.py
import benchlib  # noqa: E402
from etcd_member import Etcd  # noqa: E402
import fleet_lab  # noqa: E402
import kvm_lab  # noqa: E402

MAC = "52:54:00:be:00:02"


def device_of(dom) -> str:
    return ET.fromstring(dom.XMLDesc()).find("./devices/interface/target").get("dev")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=4)
    parser.add_argument("--store", choices=("file", "etcd"), default="file", help="file: followers sharing one SQLite file; etcd: agents sharing only etcd")
    args = parser.parse_args()
    import libvirt
    from pyroute2 import IPRoute

    from vtap_drivers.kvm.connection import start_event_loop

    env = benchlib.environment()
    work = Path(tempfile.mkdtemp(prefix="vtapbkvmmig"))
    tag = f"{os.getpid() % 100000}"
    bridge, peer, monitor, counter, netns = f"vtmb{tag}", f"vtmp{tag}", f"vtmm{tag}", f"vtmc{tag}", f"vtapbmig{tag}"
    benchlib.new_netns(netns)
    benchlib.run("ip", "link", "add", bridge, "type", "bridge")
    benchlib.run("ip", "link", "add", peer, "type", "veth", "peer", "name", "mpeer0", "netns", netns)
    benchlib.run("ip", "link", "add", monitor, "type", "veth", "peer", "name", counter)
    benchlib.run("ip", "link", "set", peer, "master", bridge)
    for name in (bridge, peer, monitor, counter):
        benchlib.run("ip", "link", "set", name, "up")
    benchlib.run("ip", "-n", netns, "addr", "add", "10.238.0.1/24", "dev", "mpeer0")
    benchlib.run("ip", "-n", netns, "link", "set", "mpeer0", "up")
    start_event_loop()
    hosts = [kvm_lab.LibvirtHost(work, "a").start(), kvm_lab.LibvirtHost(work, "b").start()]
    followers, moves, etcd = [], [], None
    try:
        uuid = str(uuidlib.uuid4())
        dom = hosts[0].connect().defineXML(kvm_lab.domain_xml("vtapmig", uuid, [MAC], bridge, "10.238.0.10", "10.238.0.1", work))
        dom.create()
        if args.store == "etcd":
            etcd = Etcd(work / "etcd")
            etcd.start()
            store = etcd.url("vtap/bench")
            first = fleet_lab.vtap_command(work / hosts[0].name / "vtap", hosts[0].uri)  # made on host a, as its admin would
            admin_env = fleet_lab.vtap_env(store, hosts[0].name)
            benchlib.run(*first, "session", "create", "mig", "--to", f"port:{monitor}", env=admin_env)
            benchlib.run(*first, "flow", "add", "mig", "--vm", uuid, "--direction", "out", env=admin_env)
            followers = [fleet_lab.start_agent(store, h.name, work / h.name / "vtap", h.uri, work / f"agent-{h.name}.log", interval=600) for h in hosts]
        else:
            state = str(work / "vtap.db")
            cli = ["vtap", "--driver", "kvm", "--state", state]
            benchlib.run(*cli, "--uri", hosts[0].uri, "session", "create", "mig", "--to", f"port:{monitor}")
            benchlib.run(*cli, "--uri", hosts[0].uri, "flow", "add", "mig", "--vm", uuid, "--direction", "out")
            followers = [subprocess.Popen([*cli, "--uri", h.uri, "follow", "--interval", "600"], stdout=subprocess.DEVNULL, stderr=open(work / f"follow-{h.name}.log", "w")) for h in hosts]
        deadline = time.monotonic() + 90
        while int(Path(f"/sys/class/net/{device_of(dom)}/statistics/rx_packets").read_text()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
        ipr = IPRoute()
        for move in range(args.moves):
            source, dest = hosts[move % 2], hosts[(move + 1) % 2]
            dconn = dest.connect()
            resumed = {}

            def lifecycle(_conn, _dom, event, detail, _opaque):
                if event == libvirt.VIR_DOMAIN_EVENT_RESUMED and detail == libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED:
                    resumed.setdefault("t", time.monotonic())

            callback = dconn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
            frames, filter_seen = {}, {}
            counters = [threading.Thread(target=lambda: frames.update(fleet_lab.count_sent_and_copied(peer, counter, MAC, 20)))]
            for thread in counters:
                thread.start()
            time.sleep(1)
            stop_watch = threading.Event()

            def watch_dest_filter():
                # The destination's new device appears during the migration: stamp vtap's filter on it.
                known = {device_of(d) for d in dconn.listAllDomains() if d.isActive()}
                while not stop_watch.is_set():
                    for d in dconn.listAllDomains():
                        try:
                            dev = device_of(d)
                        except Exception:
                            continue
                        index = ipr.link_lookup(ifname=dev) if dev and dev not in known else []
                        if index and ipr.get_filters(index=index[0], parent=0xFFFFFFF2):
                            filter_seen.setdefault("t", time.monotonic())
                            return
                    time.sleep(0.005)

            watcher = threading.Thread(target=watch_dest_filter)
            watcher.start()
            started = time.monotonic()
            flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            dom = dom.migrate(dconn, flags, None, "tcp://127.0.0.1", 0)
            took = time.monotonic() - started
            watcher.join(10)
            stop_watch.set()
            for thread in counters:
                thread.join()
            dconn.domainEventDeregisterAny(callback)
            lead = resumed["t"] - filter_seen["t"] if "t" in resumed and "t" in filter_seen else None
            moves.append({
                "from": source.name, "to": dest.name, "migration_s": took,
                "frames_sent": frames["sent"], "frames_copied": frames["copied"], "missed": frames["missed"], "extra": frames["extra"], "missed_frames": frames["missed_frames"],
                "tap_ready_before_resume_ms": None if lead is None else 1000 * lead,
            })
            print(moves[-1], flush=True)
        ipr.close()
    finally:
        for follower in followers:
            follower.send_signal(signal.SIGTERM)
            follower.wait(20)
        if etcd is not None:
            etcd.kill()
        for host in hosts:
            host.close()
        for name in (bridge, peer, monitor):
            benchlib.run("ip", "link", "del", name, check=False)
        benchlib.delete_netns(netns)
        shutil.rmtree(work, ignore_errors=True)

    figures = {**env, "store": args.store, "moves": moves, "missed_total": sum(m["missed"] for m in moves), "sent_total": sum(m["frames_sent"] for m in moves)}
    leads = [m["tap_ready_before_resume_ms"] for m in moves if m["tap_ready_before_resume_ms"] is not None]
    text = "\n".join(
        [f"kvm live migration with a tap, {len(moves)} moves between two libvirtd on this machine, "
         + ("a vtap agent each with its own state dir, sharing only etcd" if args.store == "etcd" else "a vtap follow each sharing one store file")
         + f" (load {env['loadavg_at_start'][0]:.1f})"]
        + [
            f"  {m['from']} -> {m['to']}: {m['migration_s']:.1f} s, guest frames {m['frames_sent']}, copies {m['frames_copied']}, missed {m['missed']}, extra {m['extra']}, "
            f"tap ready {m['tap_ready_before_resume_ms']:.0f} ms before resume" if m["tap_ready_before_resume_ms"] is not None else f"  {m}"
            for m in moves
        ]
        + [f"  missed in total: {figures['missed_total']} of {figures['sent_total']}; tap ready before resume in {sum(1 for v in leads if v > 0)} of {len(moves)} moves"]
    )
    print(text)
    benchlib.save("kvm_migration_etcd" if args.store == "etcd" else "kvm_migration", figures, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
