"""What one tcx link change costs the kernel, and whether doing them in parallel helps.

Why it matters: `control_plane --datapath tcx` applies 10,000 flows in minutes where the tc path
takes seconds. This measures the kernel side alone, with vtap's own calls (bpfsys, tcxprog):

    load            translate + BPF_PROG_LOAD ("tcp port 80"; the verifier's run)
    attach          BPF_LINK_CREATE on the tcx ingress hook of a fresh veth (one per link)
    detach          BPF_LINK_DETACH of those links
    attach, T thr   the same attaches from T threads at once (T = --threads)
    cls_bpf add     for comparison, the tc path's kernel object: a clsact qdisc per device
                    (not counted) and one cls_bpf + mirred filter, added over netlink in
                    batches as vtap's tc path sends them (tcnl, nlsock)
    cls_bpf del     and deleted

Where the time goes (sampled from /proc/PID/stack during an attach/detach loop on 6.18): nearly
always in synchronize_rcu_normal, called from tcx_link_attach and tcx_link_release: one RCU grace
period per link change, waited for while the change is held (threads queue behind each other).
Figures are wall time per object (ms), medians over --rounds rounds of --links objects each,
in a namespace of its own.

    python3 bench/tcx_attach.py [--links 200] [--rounds 3] [--threads 8]     (root)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402

from vtap_core.filters import compile_filter  # noqa: E402
from vtap_drivers.linux import bpfsys, tcnl, tcxprog  # noqa: E402
from vtap_drivers.linux.dataplane import CREATE, REQUEST, RTM_DELTFILTER, RTM_NEWTFILTER  # noqa: E402
from vtap_drivers.linux.nlsock import RtnlSocket  # noqa: E402

NETNS = "vtapb-tcxattach"
FILTER = "tcp port 80"


def per_object(seconds: float, count: int) -> float:
    return 1000 * seconds / count


def check(failures: list) -> None:
    for failure in failures:
        if failure is not None:
            raise failure


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def one_round(nl: RtnlSocket, devices: list[int], target: int, threads: int) -> dict:
    count = len(devices)
    programs = []
    load = timed(lambda: programs.extend(tcxprog.load_mirror(compile_filter(FILTER), target, "bench") for _ in devices))
    links: list = []
    attach = timed(lambda: links.extend(bpfsys.attach_tcx(m.prog, index, "ingress") for m, index in zip(programs, devices)))
    detach = timed(lambda: [bpfsys.detach_link(link) for link in links])
    for link in links:
        link.close()
    with ThreadPoolExecutor(threads) as pool:
        links = []
        parallel = timed(lambda: links.extend(pool.map(lambda pair: bpfsys.attach_tcx(pair[0].prog, pair[1], "ingress"), zip(programs, devices))))
        pool.map(bpfsys.detach_link, links)
    for link in links:
        link.close()
    for program in programs:
        program.close()
    classic = compile_filter(FILTER)
    adds = [(tcnl.mirror_filter_request(index, "ingress", 1, classic, target, b"bench"), RTM_NEWTFILTER, CREATE) for index in devices]
    deletes = [(tcnl.filter_query(index, "ingress", prio=1), RTM_DELTFILTER, REQUEST) for index in devices]
    add = timed(lambda: check(nl.requests(adds)))
    on_first = lambda: benchlib.run("tc", "filter", "show", "dev", "a0", "ingress").stdout  # noqa: E731
    if "mirred" not in on_first():
        raise RuntimeError("the cls_bpf filters were not added")
    delete = timed(lambda: check(nl.requests(deletes)))
    if on_first().strip():
        raise RuntimeError("the cls_bpf filters were not deleted")
    return {
        "load": per_object(load, count),
        "attach": per_object(attach, count),
        "detach": per_object(detach, count),
        f"attach, {threads} threads": per_object(parallel, count),
        "cls_bpf add": per_object(add, count),
        "cls_bpf del": per_object(delete, count),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--links", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("tcx_attach: needs root (namespaces, bpf(2))", file=sys.stderr)
        return 2
    env = benchlib.environment()
    benchlib.delete_netns(NETNS)
    benchlib.new_netns(NETNS)
    try:
        benchlib.enter_netns(NETNS)
        ipr = IPRoute()
        for i in range(args.links):
            ipr.link("add", ifname=f"a{i}", kind="veth", peer={"ifname": f"b{i}"})
        ipr.link("add", ifname="mon0", kind="veth", peer={"ifname": "mon1"})
        devices = [socket.if_nametoindex(f"a{i}") for i in range(args.links)]
        for index in devices:
            ipr.tc("add", "clsact", index)
        target = socket.if_nametoindex("mon0")
        ipr.close()
        nl = RtnlSocket()
        rounds = [one_round(nl, devices, target, args.threads) for _ in range(args.rounds)]
        nl.close()
    finally:
        benchlib.delete_netns(NETNS)
    figures = {what: statistics.median(r[what] for r in rounds) for what in rounds[0]}
    lines = [
        f"tcx link changes vs cls_bpf filters: {args.links} objects per round, {args.rounds} rounds, medians",
        f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        f"{'operation':<20}{'ms per object':>14}",
        *(f"{what:<20}{value:>14.2f}" for what, value in figures.items()),
        "",
        f"10,000 flows on 10,000 devices (both directions) = 20,000 links: attach alone {figures['attach'] * 20:.0f} s, "
        f"detach {figures['detach'] * 20:.0f} s; cls_bpf add {figures['cls_bpf add'] * 20:.1f} s",
    ]
    text = "\n".join(lines)
    print(text)
    benchlib.save("tcx_attach", {"environment": env, "links": args.links, "rounds": rounds, "median_ms": figures}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
