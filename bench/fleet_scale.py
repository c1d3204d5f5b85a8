"""A fleet against one etcd: 100 hosts x 100 VMs = 10,000 VMs, one flow per VM.

How hosts are simulated (2 cores do not fit 100 agent processes plus their libvirtd):
each host is a `vtap_core.agent.Agent` in THIS process (its own threads: follower,
heartbeat, store watch, reporter), with its own etcd store client, its own state dir,
its own libvirt test:/// connection (a node XML of 100 running VMs) and its own network
namespace holding its VMs' host-side devices (ifb devices vm0..vm99) and the target mon0.
The bench shares one libvirt connection per host between the agent's reads and its event
watch (test:/// gives every open() a private copy), so that a VM started on a host's
connection is an event there. A "move" destroys and undefines the VM on host A's connection
and starts it on host B's (same UUID and MAC, B's device mv0). Because 100 hosts share one
process and 2 cores, the agents' periodic work is spread out: resync every 300 s, counters
every 60 s, etcd client timeout 30 s (real hosts each have their own CPU). Agents start one
after another (each after the previous one's first read). etcd runs with --max-txn-ops and
--max-request-bytes raised so that the 10,000-flow `apply` fits in its one transaction.

Figures: flow add -> realized on the owning host (tc filter on its device), p50/p99;
VM moved A -> B -> tap on B, p50/p99; etcd requests per change per host (every agent's
HTTP requests counted at its etcd3gw session); peak RSS of one `vtap agent` process with
the 10,000 flows desired; `vtap status` over the whole fleet (a separate process).

    python3 bench/fleet_scale.py [--hosts 100] [--vms 100] [--adds 60] [--moves 100]
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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import benchlib  # noqa: E402
from etcd_member import Etcd  # noqa: E402

PREFIX = f"vtfb{os.getpid() % 100000}"


def vm_uuid(host: int, i: int) -> str:
    return f"00000000-0000-4000-8{host:03d}-{i:012d}"


def domain_xml(host: int, i: int, device: str) -> str:
    return (
        f"<domain type='test'><name>h{host}vm{i}</name><uuid>{vm_uuid(host, i)}</uuid>"
        "<memory>65536</memory><os><type>hvm</type></os><devices>"
        f"<interface type='bridge'><mac address='52:54:{host >> 8:02x}:{host & 255:02x}:{i >> 8:02x}:{i & 255:02x}'/>"
        f"<source bridge='br0'/><target dev='{device}'/></interface></devices></domain>"
    )


def node_xml(host: int | None, vms: int) -> str:
    return "<node>" + ("".join(domain_xml(host, i, f"vm{i}") for i in range(vms)) if host is not None else "") + "</node>"


def share_libvirt_connections():
    """One connection per test:/// URI in this process: reads and the event watch see the same VMs."""
    import libvirt

    from vtap_drivers.kvm.connection import start_event_loop

    start_event_loop()  # before any connection is opened, or the test driver's events have no loop
    opened, real_open = {}, libvirt.open
    lock = threading.Lock()

    def shared_open(uri):
        with lock:
            if uri not in opened:
                conn = real_open(uri)
                conn.close = lambda: 0  # the agent's watch closes "its" connection on stop
                opened[uri] = conn
            return opened[uri]

    libvirt.open = shared_open
    return opened


def count_requests(store, counts: dict):
    """Counts every HTTP request this store sends to etcd, by API path."""
    for client in store._clients:
        client.timeout = 30  # 101 clients share one interpreter lock here: a 3 MB read can take longer than 5 s
        post = client.session.post

        def counted(url, *args, _post=post, **kwargs):
            path = url.split("/v3", 1)[-1]
            counts[path] = counts.get(path, 0) + 1
            return _post(url, *args, **kwargs)

        client.session.post = counted


def sum_counts(all_counts: list[dict]) -> dict:
    total: dict = {}
    for counts in all_counts:
        for path, n in list(counts.items()):
            total[path] = total.get(path, 0) + n
    return total


def make_netns(name: str, devices: list[str]) -> str:
    benchlib.new_netns(name)
    batch = "".join(f"link add {d} type ifb\nlink set {d} up\n" for d in devices)
    subprocess.run(["ip", "-n", name, "-batch", "-"], input=batch, text=True, check=True)
    return name


class Kernel:
    """Reads tc filters of one device in one namespace (pyroute2, one socket per namespace)."""

    def __init__(self, netns: str):
        from pyroute2 import IPRoute

        self.ipr = IPRoute(netns=netns)
        self.index: dict = {}

    def has_filter(self, device: str) -> bool:
        if device not in self.index:
            self.index[device] = self.ipr.link_lookup(ifname=device)[0]
        index = self.index[device]
        return any(True for parent in (0xFFFFFFF2, 0xFFFFFFF3) for _ in self.ipr.get_filters(index=index, parent=parent))

    def close(self):
        self.ipr.close()


def wait_until(predicate, seconds=30.0, step=0.005) -> float | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--adds", type=int, default=60, help="flow add samples (one per host)")
    parser.add_argument("--moves", type=int, default=100, help="VM move samples")
    parser.add_argument("--agent-only", action="store_true", help="only the separate agent process (peak RSS) and `vtap status`, with hosts x vms flows desired and no in-process hosts")
    args = parser.parse_args()
    me = os.getpid()  # pyroute2 forks helpers for namespaces: only this process cleans up when stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1) if os.getpid() == me else os._exit(0))
    env = benchlib.environment()
    work = tempfile.mkdtemp(prefix="vtapbfleet", dir="/var/tmp")  # not /tmp: other runs clean up vtap* there
    os.chmod(work, 0o700)
    namespaces: list[str] = []
    etcd = None
    # The separate agent process (peak RSS) runs in a namespace of its own, reaching etcd over a veth.
    rss_ns = make_netns(f"{PREFIX}rss", [f"vm{i}" for i in range(args.vms)] + ["mon0"])
    namespaces.append(rss_ns)
    net = f"198.18.{os.getpid() % 250}"
    try:
        benchlib.run("ip", "link", "add", f"{PREFIX}e", "type", "veth", "peer", "name", "up0", "netns", rss_ns)
        benchlib.run("ip", "addr", "add", f"{net}.1/30", "dev", f"{PREFIX}e")
        benchlib.run("ip", "link", "set", f"{PREFIX}e", "up")
        benchlib.run("ip", "-n", rss_ns, "addr", "add", f"{net}.2/30", "dev", "up0")
        benchlib.run("ip", "-n", rss_ns, "link", "set", "up0", "up")
        # One member on loopback and on the veth the separate agent process reaches it through.
        etcd = Etcd(os.path.join(work, "etcd"), listen_also=f"{net}.1")
        etcd.extra = ["--max-txn-ops", "50000", "--max-request-bytes", str(32 << 20)]
        etcd.start()
        port = etcd.client_port
        if args.agent_only:
            return run_agent_only(args, env, work, port, rss_ns, f"{net}.1:{port}")
        return run(args, env, work, port, namespaces, rss_ns, f"{net}.1:{port}")
    finally:
        if etcd is not None:
            etcd.kill()
        benchlib.run("ip", "link", "del", f"{PREFIX}e", check=False)
        benchlib.delete_netns(*namespaces)
        shutil.rmtree(work, ignore_errors=True)


def run(args, env, work, port, namespaces, rss_ns, rss_endpoint) -> int:
    import vtap_core.agent as agent_module
    from vtap_core.agent import Agent
    from vtap_core.client import Client
    from vtap_drivers.linux.dataplane import TcDataplane

    agent_module.COUNTERS_EVERY = 60.0  # see the module docstring: 100 hosts share 2 cores here
    url = f"etcd://127.0.0.1:{port}/vtap/bench"
    hosts, vms = args.hosts, args.vms
    spare = max(1, -(-args.moves // hosts))
    t = time.monotonic()
    host_ns = []
    for h in range(hosts):
        host_ns.append(make_netns(f"{PREFIX}h{h}", [f"vm{i}" for i in range(vms)] + [f"mv{j}" for j in range(spare)] + ["mon0"]))
        namespaces.append(host_ns[-1])
    admin_ns = make_netns(f"{PREFIX}adm", [])
    namespaces.append(admin_ns)
    setup_s = time.monotonic() - t
    print(f"{hosts} namespaces with {hosts * (vms + spare + 1)} devices: {setup_s:.1f} s", flush=True)
    connections = share_libvirt_connections()

    def uri_of(name: str, host: int | None) -> str:
        path = os.path.join(work, f"{name}.xml")
        with open(path, "w") as f:
            f.write(node_xml(host, vms))
        return f"test://{path}"

    admin = Client(driver="kvm", state=os.path.join(work, "admin", "state.db"), store=url, host="admin", uri=uri_of("admin", None))
    admin.driver._tc = TcDataplane(netns=admin_ns, state_dir=admin.store.state_dir)
    count_requests(admin.store, {})

    # The desired state: one session, a flow per VM except each host's last VM (the flow add samples).
    t = time.monotonic()
    flows = [{"name": f"h{h}v{i}", "vm": vm_uuid(h, i), "direction": "in"} for h in range(hosts) for i in range(vms - 1)]
    admin.apply_document({"sessions": [{"name": "fleet", "to": "port:mon0", "flows": flows}]}, source="fleet")
    apply_s = time.monotonic() - t
    print(f"apply of {len(flows)} flows (one etcd transaction): {apply_s:.2f} s", flush=True)

    agents, counts, kernels = [], [], []
    stop = threading.Event()
    for h in range(hosts):
        client = Client(driver="kvm", state=os.path.join(work, f"h{h}", "state.db"), store=url, host=f"h{h}", uri=uri_of(f"h{h}", h))
        client.driver._tc = TcDataplane(netns=host_ns[h], state_dir=client.store.state_dir)
        counts.append({})
        count_requests(client.store, counts[-1])
        agents.append(Agent(client, f"h{h}", interval=300.0))
        kernels.append(Kernel(host_ns[h]))
    t = time.monotonic()
    threads = [threading.Thread(target=a.run, args=(stop,), name=f"host{h}", daemon=True) for h, a in enumerate(agents)]
    for agent, thread in zip(agents, threads):
        thread.start()  # one after another, as hosts boot: each agent's first read of 10,000 flows at its own time
        agent._watch_ready.wait(60)

    def active_reported() -> int:
        return sum(1 for row in admin.store.observed() if row.get("state") == "active")

    converged = wait_until(lambda: active_reported() >= len(flows), seconds=900, step=2.0)
    converge_s = (converged or time.monotonic()) - t
    print(f"agents started; all {len(flows)} flows active and reported: {converge_s:.1f} s", flush=True)
    time.sleep(5)

    # flow add -> realized on the owning host
    add_total, add_commit = [], []
    before = sum_counts(counts)
    started = time.monotonic()
    for k in range(min(args.adds, hosts)):
        h = k
        device = f"vm{vms - 1}"
        t0 = time.monotonic()
        admin.add_flow("fleet", vm=vm_uuid(h, vms - 1), direction="in", name=f"add{k}")
        t1 = time.monotonic()
        done = wait_until(lambda: kernels[h].has_filter(device))
        if done is not None:
            add_total.append(done - t0)
            add_commit.append(done - t1)
    during = time.monotonic() - started
    after = sum_counts(counts)
    time.sleep(2)
    quiet_start, quiet_before = time.monotonic(), sum_counts(counts)
    time.sleep(20.0)
    quiet = time.monotonic() - quiet_start
    quiet_after = sum_counts(counts)
    changes = min(args.adds, hosts)
    per_change = {}
    for path in sorted(set(after) | set(quiet_after)):
        busy = after.get(path, 0) - before.get(path, 0)
        idle_rate = (quiet_after.get(path, 0) - quiet_before.get(path, 0)) / quiet
        per_change[path] = round((busy - idle_rate * during) / changes / hosts, 4)
    idle_per_host_s = {p: round((quiet_after.get(p, 0) - quiet_before.get(p, 0)) / quiet / hosts, 3) for p in sorted(quiet_after)}
    print(f"flow add -> tap on its host: p50 {benchlib.percentile(add_total, 50):.3f} s, p99 {benchlib.percentile(add_total, 99):.3f} s "
          f"(after the commit: p50 {benchlib.percentile(add_commit, 50):.3f} s, p99 {benchlib.percentile(add_commit, 99):.3f} s)", flush=True)
    print(f"etcd requests per change per host (beyond the idle rate): {per_change}", flush=True)
    print(f"idle requests per host per second: {idle_per_host_s}", flush=True)

    # a VM moved from host A to host B -> tap on B
    moves = []
    for k in range(args.moves):
        a, b, i, j = k % hosts, (k + 1) % hosts, (k // hosts) % (vms - 1), k // hosts
        conn_a = connections[agents[a].client.driver.uri]
        conn_b = connections[agents[b].client.driver.uri]
        dom = conn_a.lookupByUUIDString(vm_uuid(a, i))
        dom.destroy()
        dom.undefine()
        benchlib.run("ip", "-n", host_ns[a], "link", "del", f"vm{i}")  # its tap device goes with the VM, as QEMU's does
        t0 = time.monotonic()
        conn_b.createXML(domain_xml(a, i, f"mv{j}"), 0)
        done = wait_until(lambda: kernels[b].has_filter(f"mv{j}"))
        if done is not None:
            moves.append(done - t0)
    if moves:
        print(f"VM moved A -> B -> tap on B: p50 {benchlib.percentile(moves, 50):.3f} s, p99 {benchlib.percentile(moves, 99):.3f} s "
              f"({len(moves)}/{args.moves} realized)", flush=True)

    # `vtap status` over the whole fleet, as a separate process on the admin machine
    status_env = {**{k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}, "VTAP_STORE": url, "VTAP_DRIVER": "kvm",
                  "VTAP_LIBVIRT_URI": admin.driver.uri, "VTAP_HOST": "admin"}
    status_times, status_rows = [], 0
    for _ in range(3):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "vtap_cli.main", "--state", os.path.join(work, "admin", "state.db"), "-o", "json", "status"],
                             env=status_env, capture_output=True, text=True)
        status_times.append(time.monotonic() - t0)
        if out.returncode == 0:
            status_rows = len(json.loads(out.stdout))
        else:
            print(out.stderr, file=sys.stderr)
    print(f"vtap status over the fleet: {benchlib.median(status_times):.2f} s median of 3 ({status_rows} rows)", flush=True)

    # peak RSS of one `vtap agent` process with the 10,000 flows desired (host 1's VMs, its own namespace)
    agent_env = {**status_env, "VTAP_STORE": f"etcd://{rss_endpoint}/vtap/bench", "VTAP_LIBVIRT_URI": uri_of("rss", 1), "VTAP_HOST": "rss"}
    process = subprocess.Popen(["ip", "netns", "exec", rss_ns, sys.executable, "-m", "vtap_cli.main", "--state", os.path.join(work, "rss", "state.db"),
                                "agent", "--interval", "300"], env=agent_env, stderr=subprocess.PIPE, text=True)
    rss_kib, rss_flows = None, 0
    try:
        rss_kernel = Kernel(rss_ns)
        wait_until(lambda: sum(rss_kernel.has_filter(f"vm{i}") for i in range(vms - 1)) >= vms - 2, seconds=120, step=0.5)
        rss_flows = sum(rss_kernel.has_filter(f"vm{i}") for i in range(vms))
        time.sleep(12)  # a reporter round with counters
        for line in open(f"/proc/{process.pid}/status"):  # `ip netns exec` execs python in its own process
            if line.startswith("VmHWM:"):
                rss_kib = int(line.split()[1])
        rss_kernel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    print(f"one vtap agent process, {len(flows) + changes} flows desired, {rss_flows} realized on it: peak RSS {rss_kib and rss_kib // 1024} MiB", flush=True)

    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    for kernel in kernels:
        kernel.close()
    for a in agents:
        a.client.close()
    admin.close()

    result = {
        **env,
        "loadavg_at_end": os.getloadavg(),  # other work on the machine shares its cores: say how much
        "hosts_simulated_as": "Agent objects in one process, each with its own etcd client, state dir, libvirt test:/// connection and network namespace",
        "hosts": hosts, "vms_per_host": vms, "flows": len(flows) + changes,
        "agent_interval_s": 300, "agent_counters_every_s": 60,
        "setup_namespaces_s": round(setup_s, 2), "apply_all_flows_s": round(apply_s, 2), "initial_convergence_s": round(converge_s, 1),
        "flow_add_to_tap_p50_s": round(benchlib.percentile(add_total, 50), 3), "flow_add_to_tap_p99_s": round(benchlib.percentile(add_total, 99), 3),
        "flow_add_after_commit_p50_s": round(benchlib.percentile(add_commit, 50), 3), "flow_add_after_commit_p99_s": round(benchlib.percentile(add_commit, 99), 3),
        "flow_add_samples": len(add_total),
        "vm_move_to_tap_p50_s": round(benchlib.percentile(moves, 50), 3) if moves else None,
        "vm_move_to_tap_p99_s": round(benchlib.percentile(moves, 99), 3) if moves else None,
        "vm_move_samples": len(moves),
        "etcd_requests_per_change_per_host": per_change, "etcd_idle_requests_per_host_per_s": idle_per_host_s,
        "agent_peak_rss_mib": rss_kib and round(rss_kib / 1024, 1), "agent_rss_flows_realized": rss_flows,
        "status_fleet_s": round(benchlib.median(status_times), 2), "status_rows": status_rows,
        "targets": {"flow_add_p99_s": 1.0, "vm_move_p99_s": 1.0, "agent_rss_mib": 100, "status_s": 2.0},
    }
    os.makedirs(benchlib.RESULTS, exist_ok=True)
    with open(os.path.join(benchlib.RESULTS, "fleet_scale.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    lines = [
        f"vtap fleet: {hosts} hosts x {vms} VMs = {hosts * vms} VMs, one flow each, one etcd ({result['date']}, commit {result['commit']}, "
        f"{result['cpus']} CPUs, load at start {result['loadavg_at_start'][0]:.1f}, at the end {result['loadavg_at_end'][0]:.1f})",
        "hosts: Agent objects sharing this process (own etcd client, state dir, libvirt test:/// connection, network namespace);",
        f"       resync every 300 s, counters every 60 s ({hosts} hosts on {result['cpus']} cores)",
        f"apply {len(flows)} flows (one txn)    {apply_s:6.2f} s",
        f"all flows active, reported     {converge_s:6.1f} s after the agents started",
        f"flow add -> tap on its host    p50 {result['flow_add_to_tap_p50_s']:.3f} s  p99 {result['flow_add_to_tap_p99_s']:.3f} s   (target p99 <= 1 s; "
        f"after the commit p50 {result['flow_add_after_commit_p50_s']:.3f} p99 {result['flow_add_after_commit_p99_s']:.3f})",
        f"VM moved A -> B -> tap on B    p50 {result['vm_move_to_tap_p50_s']} s  p99 {result['vm_move_to_tap_p99_s']} s   (target p99 <= 1 s; {len(moves)} moves)",
        f"etcd requests / change / host  {per_change}",
        f"etcd requests / host / s idle  {idle_per_host_s}",
        f"agent peak RSS                 {result['agent_peak_rss_mib']} MiB with {result['flows']} flows desired   (target <= 100 MiB)",
        f"vtap status, whole fleet       {result['status_fleet_s']:.2f} s, {status_rows} rows   (target <= 2 s)",
    ]
    with open(os.path.join(benchlib.RESULTS, "fleet_scale.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def run_agent_only(args, env, work, port, rss_ns, rss_endpoint) -> int:
    """hosts x vms flows desired, one `vtap agent` process realizing host 1's 100: its peak RSS; `vtap status` from an admin machine."""
    from vtap_core.client import Client

    url = f"etcd://127.0.0.1:{port}/vtap/bench"
    paths = {}
    for name, host in (("admin", None), ("rss", 1)):
        paths[name] = os.path.join(work, f"{name}.xml")
        with open(paths[name], "w") as f:
            f.write(node_xml(host, args.vms))
    flows = [{"name": f"h{h}v{i}", "vm": vm_uuid(h, i), "direction": "in"} for h in range(args.hosts) for i in range(args.vms)]
    with Client(driver="kvm", state=os.path.join(work, "admin", "state.db"), store=url, host="admin", uri=f"test://{paths['admin']}") as admin:
        admin.apply_document({"sessions": [{"name": "fleet", "to": "port:mon0", "flows": flows}]}, source="fleet")
    base = {**{k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}, "VTAP_DRIVER": "kvm"}
    agent_env = {**base, "VTAP_STORE": f"etcd://{rss_endpoint}/vtap/bench", "VTAP_LIBVIRT_URI": f"test://{paths['rss']}", "VTAP_HOST": "rss"}
    process = subprocess.Popen(["ip", "netns", "exec", rss_ns, sys.executable, "-m", "vtap_cli.main", "--state", os.path.join(work, "rss", "state.db"),
                                "agent", "--interval", "30"], env=agent_env, stderr=subprocess.DEVNULL)
    try:
        kernel = Kernel(rss_ns)
        wait_until(lambda: sum(kernel.has_filter(f"vm{i}") for i in range(args.vms)) >= args.vms, seconds=180, step=0.5)
        realized = sum(kernel.has_filter(f"vm{i}") for i in range(args.vms))
        kernel.close()
        time.sleep(35)  # a periodic resync and a counters report
        rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{process.pid}/status") if line.startswith("VmHWM:"))
        status_env = {**base, "VTAP_STORE": url, "VTAP_LIBVIRT_URI": f"test://{paths['admin']}", "VTAP_HOST": "admin"}
        times, rows = [], 0
        for _ in range(3):
            t0 = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "vtap_cli.main", "--state", os.path.join(work, "admin", "state.db"), "-o", "json", "status"],
                                 env=status_env, capture_output=True, text=True)
            times.append(time.monotonic() - t0)
            rows = len(json.loads(out.stdout)) if out.returncode == 0 else 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    result = {**env, "flows_desired": len(flows), "agent_flows_realized": realized, "agent_peak_rss_mib": round(rss_kib / 1024, 1),
              "status_s": round(benchlib.median(times), 2), "status_rows": rows, "targets": {"agent_rss_mib": 100, "status_s": 2.0}}
    with open(os.path.join(benchlib.RESULTS, "fleet_scale_agent.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    text = (f"one `vtap agent` process (kvm, test:///, its own namespace), {len(flows)} flows desired in etcd, {realized} realized on it "
            f"({result['date']}, commit {result['commit']}, load at start {result['loadavg_at_start'][0]:.1f})\n"
            f"agent peak RSS            {result['agent_peak_rss_mib']} MiB   (target <= 100 MiB)\n"
            f"vtap status (admin)       {result['status_s']:.2f} s median of 3, {rows} rows   (target <= 2 s)\n")
    with open(os.path.join(benchlib.RESULTS, "fleet_scale_agent.txt"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
