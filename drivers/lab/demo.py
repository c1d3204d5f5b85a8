"""`vtap demo`: the whole idea in 30 seconds, on real namespaces and real packets.

It builds the lab (topology.py), creates a filtered session through the same
Client, store, reconcile and tc dataplane as every other command, sends
several kinds of traffic, counts what reached the monitoring port, then moves
a VM to the other host and shows the tap following it (the Follower, as in
`vtap follow`). Exit status 0 only if every count was exactly right.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter

from vtap_core.client import Client
from vtap_core.errors import OperationFailed
from vtap_core.follow import Follower
from vtap_drivers.lab import traffic
from vtap_drivers.lab.topology import Lab, vm_ip, vm_mac, vm_uuid

PREFIX = Lab().prefix  # the lab driver's default: `vtap --driver lab` sees a kept demo lab
PLACEMENT = {"vm1": "host1", "vm2": "host1", "vm3": "host2"}
BURST = 20
FILTER = "tcp dst port 80 or udp dst port 53"


def frames_from(src: int, dst: int, kind: str, count: int = BURST) -> list[bytes]:
    ends = (vm_mac(src), vm_mac(dst), vm_ip(src), vm_ip(dst))
    if kind == "tcp/80":
        return [traffic.tcp_frame(*ends, 41000 + i, 80, seq=i + 1) for i in range(count)]
    if kind == "tcp/22":
        return [traffic.tcp_frame(*ends, 42000 + i, 22, seq=i + 1) for i in range(count)]
    if kind == "udp/53":
        return [traffic.udp_frame(*ends, 43000 + i, 53) for i in range(count)]
    return [traffic.icmp_echo_frame(*ends, seq=i + 1) for i in range(count)]


# (sender, receiver, kind): what vm1 sends is mirrored if it matches the filter.
TRAFFIC = [
    (1, 2, "tcp/80"),
    (1, 2, "udp/53"),
    (1, 2, "icmp"),
    (1, 3, "tcp/22"),
    (3, 1, "tcp/80"),  # received by vm1: direction "in", not asked for
    (2, 3, "tcp/80"),  # another VM's traffic
]


class Report:
    def __init__(self, say):
        self.say = say
        self.ok = True

    def check(self, what: str, good: bool):
        self.ok &= good
        self.say(f"  {'ok ' if good else 'BAD'} {what}")


def send_round(lab: Lab, sniffers: dict) -> dict:
    for sniffer in sniffers.values():
        sniffer.reset()
    for src, dst, kind in TRAFFIC:
        traffic.send(lab.ns(f"vm{src}"), "eth0", frames_from(src, dst, kind))
    return {port: sniffer.settle() for port, sniffer in sniffers.items()}


def show_round(report: Report, counts: Counter, port: str):
    report.say(f"  {'sent':<28} {'frames':>6}  {'reached ' + port:>14}")
    for src, dst, kind in TRAFFIC:
        got = counts[(vm_mac(src), kind)]
        report.say(f"  vm{src} -> vm{dst} {kind:<16} {BURST:>6}  {got:>14}")
    expected = Counter({(vm_mac(1), "tcp/80"): BURST, (vm_mac(1), "udp/53"): BURST})
    extra = sum(counts.values()) - sum(counts[k] for k in expected)
    report.check(f"exactly the {2 * BURST} matching frames sent by vm1 arrived, and {extra} others", counts == expected)


def run_demo(keep: bool = False, state: str | None = None, say=print) -> int:
    if os.geteuid() != 0:
        raise OperationFailed("vtap demo needs root: it builds network namespaces and tc filters")
    started = time.monotonic()
    lab = Lab(PREFIX)
    workdir = tempfile.mkdtemp(prefix="vtap-demo-")
    state = state or os.path.join(workdir, "state.db")
    report = Report(say)
    say("vtap demo: two hosts, three VMs, one monitoring tool, all network namespaces on this machine")
    lab.build(PLACEMENT)
    vm1 = vm_uuid(PREFIX, "vm1")
    for name, host in PLACEMENT.items():
        say(f"  {name} {vm_uuid(PREFIX, name)} on {host}, NIC {vm_mac(int(name[-1]))} -> tap-{name}")
    client = Client(driver="lab", state=state, prefix=PREFIX, command="demo")
    sniffers = {port: traffic.Sniffer(lab.ns("mon"), port) for port in ("h1", "h2")}
    stop = threading.Event()
    follower_thread = None
    try:
        say(f"\n1. vtap session create ids --to port:mon0; vtap flow add ids --vm {vm1} --direction out --filter '{FILTER}'")
        client.create_session("ids", to="port:mon0")
        client.add_flow("ids", vm=vm1, direction="out", filter=FILTER, name="vm1-out")
        say("   the filter runs in the kernel (tc cls_bpf on tap-vm1); copies go to host1's mon0")
        counts = send_round(lab, sniffers)
        show_round(report, counts["h1"], "host1 mon0")
        row = client.status()[0]
        report.check(f"vtap status: {row.state}, {row.packets} packets counted by the kernel", row.state == "active" and row.packets == 2 * BURST)

        say("\n2. vtap follow is running; vm1 migrates from host1 to host2 (its tap device is re-created there)")
        follower = Follower(Client(driver="lab", state=state, prefix=PREFIX, command="demo follow"), interval=5.0)
        follower_thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
        follower_thread.start()
        time.sleep(0.3)
        moved = time.monotonic()
        lab.move("vm1", "host2")
        row = wait_for_active(client, "vm1-out", host="host2", lab=lab)
        say(f"   tap followed vm1 in {1000 * (time.monotonic() - moved):.0f} ms")
        counts = send_round(lab, sniffers)
        show_round(report, counts["h2"], "host2 mon0")
        report.check("nothing reached host1's mon0 any more", sum(counts["h1"].values()) == 0)
        leftovers = [b for b in client.driver.observe() if f"/{lab.ns('host1')}/" in b.key]
        report.check("no vtap filter left on host1", not leftovers)
    finally:
        stop.set()
        if follower_thread:
            follower_thread.join(timeout=10)
        for sniffer in sniffers.values():
            sniffer.close()
        if not keep:
            client.delete_session("ids") if client.store.has_session("ids") else None
            lab.destroy()
        client.close()
    say(f"\n{'PASS' if report.ok else 'FAIL'} in {time.monotonic() - started:.1f} s" + (f"; lab kept (namespaces {PREFIX}-*, state {state})" if keep else "; lab removed"))
    return 0 if report.ok else 1


def wait_for_active(client: Client, flow: str, host: str, lab: Lab, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in client.status() if r.flow == flow]
        on_host = [b for b in client.driver.observe() if b.flow == flow and f"/{lab.ns(host)}/" in b.key]
        if rows and rows[0].state == "active" and on_host:
            return rows[0]
        time.sleep(0.05)
    raise OperationFailed(f"the tap did not follow within {timeout:.0f} s")
