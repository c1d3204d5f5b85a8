"""What the benchmarks share: namespaces, device counters, result files.

Benchmarks may run ip/tc/iperf3 (product code may not); each names its
namespaces with its own prefix and the process id, so parallel runs and test
runs never collide.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

# VTAP_BENCH_RESULTS: elsewhere (capture_sink_lane.py's guest sees the checkout read-only)
RESULTS = os.environ.get("VTAP_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(*command, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True, **kwargs)


def new_netns(name: str) -> str:
    """A fresh namespace with IPv6 autoconfiguration off, so counters see only the benchmark's traffic."""
    run("ip", "netns", "add", name)
    run("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    run("ip", "-n", name, "link", "set", "lo", "up")
    return name


def delete_netns(*names: str) -> None:
    for name in names:
        run("ip", "netns", "del", name, check=False)


def enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into `name`: the product then works there unchanged."""
    from pyroute2 import netns

    netns.setns(name, flags=0)


def link_counters(device: str, netns: str | None = None) -> dict:
    """{'rx': packets, 'tx': packets, 'rx_dropped', 'tx_dropped'} as the kernel counts them."""
    where = ["-n", netns] if netns else []
    info = json.loads(run("ip", *where, "-j", "-s", "link", "show", "dev", device).stdout)[0]
    stats = info["stats64"]
    return {"rx": stats["rx"]["packets"], "tx": stats["tx"]["packets"], "rx_dropped": stats["rx"]["dropped"], "tx_dropped": stats["tx"]["dropped"]}


def pinned(cpu: str, *command) -> list[str]:
    """The command on one CPU at a higher priority (a capture measured apart from the sender)."""
    return ["taskset", "-c", cpu, "nice", "-n", "-10", *command]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def frames_in(path: str) -> int:
    """Packets in a pcap/pcapng file (capinfos); 0 when there is no file."""
    if not os.path.exists(path):
        return 0
    out = run("capinfos", "-c", "-M", path, check=False).stdout
    return int(out.split("Number of packets:")[1].split()[0]) if "Number of packets:" in out else 0


def percentile(values, p):
    """The nearest-rank p-th percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def git_commit() -> str:
    """HEAD, with "+changes" when the product's files differ from it (others' work in progress)."""
    repo = os.path.dirname(os.path.dirname(RESULTS))
    head = run("git", "-C", repo, "rev-parse", "--short", "HEAD", check=False).stdout.strip() or "?"
    dirty = run("git", "-C", repo, "diff", "--quiet", "HEAD", "--", "vtap_core", "drivers", "cli", check=False).returncode
    return head + ("+changes" if dirty else "")


def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def save(name: str, data: dict, text: str) -> None:
    """bench/results/<name>.json (figures) and <name>.txt (what was printed)."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(RESULTS, f"{name}.txt"), "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    print(f"\nwritten: bench/results/{name}.json, bench/results/{name}.txt")
