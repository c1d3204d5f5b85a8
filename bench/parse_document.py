"""Large declarative files: parse and validate an `apply` file of 10,000 / 20,000 / 40,000 flows.

What `vtap apply -f FILE` does before it touches the store or the platform:
YAML to Python (libyaml's C loader, yaml.CSafeLoader, beside the pure-Python
yaml.SafeLoader for comparison) and parse_document(), which builds and checks
every session and flow (unknown keys, names listed twice, sources, filters by
syntax are checked later by the driver's plan). The file: 40 sessions to
port:mon<n>, each with its share of flows on interfaces, half of them named,
half left to vtap to name, each with a filter. Growth from 20,000 to 40,000
flows shows whether the cost is linear.

Target: 40,000 flows parsed and validated in <= 5 s (the apply itself: bench/control_plane.py).

    python3 bench/parse_document.py [--flows 10000,20000,40000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

TARGET_S = 5.0
SESSIONS = 40


def write_file(path: str, flows: int) -> None:
    per_session = flows // SESSIONS
    lines = ["sessions:"]
    for s in range(SESSIONS):
        lines += [f"  - name: s{s}", f"    to: port:mon{s}", "    flows:"]
        for f in range(per_session):
            n = s * per_session + f
            name = [f"      - name: f{n}", "        interface: eth%d" % (n % 4000)] if f % 2 else [f"      - interface: eth{n % 4000}"]
            lines += name + ["        direction: both", f"        filter: tcp port {1 + n % 65535}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def timed(action):
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def measure(path: str, loader, gc_paused: bool = False) -> dict:
    """Seconds to load and to parse+validate; gc_paused: as apply_file does it (client.paused_gc)."""
    from vtap_core.client import parse_document, paused_gc

    pause = paused_gc() if gc_paused else contextlib.nullcontext()
    with open(path) as f, pause:
        load_s, document = timed(lambda: yaml.load(f, Loader=loader))
        parse_s, (sessions, flows) = timed(lambda: parse_document(document))
    return {"load_s": load_s, "parse_validate_s": parse_s, "total_s": load_s + parse_s, "sessions": len(sessions), "flows": len(flows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="10000,20000,40000", help="comma-separated sizes")
    parser.add_argument("--pure-python", action="store_true", help="also time yaml.SafeLoader (slow)")
    args = parser.parse_args()
    env = benchlib.environment()
    sizes = [int(n) for n in args.flows.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="vtapbpd-") as workdir:
        for size in sizes:
            path = os.path.join(workdir, f"flows-{size}.yaml")
            write_file(path, size)
            row = {"flows": size, "file_bytes": os.path.getsize(path), "libyaml_gc_on": measure(path, yaml.CSafeLoader), "libyaml": measure(path, yaml.CSafeLoader, gc_paused=True)}
            if args.pure_python:
                row["pure_python"] = measure(path, yaml.SafeLoader)
            results.append(row)
            c = row["libyaml"]
            extra = f"; pure-Python loader {row['pure_python']['load_s']:.2f} s" if args.pure_python else ""
            print(f"{size} flows ({row['file_bytes'] / 1e6:.1f} MB): libyaml load {c['load_s']:.2f} s + parse/validate {c['parse_validate_s']:.2f} s = {c['total_s']:.2f} s (cyclic GC on: {row['libyaml_gc_on']['total_s']:.2f} s){extra}", flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    largest = results[-1]
    met = largest["libyaml"]["total_s"] <= TARGET_S
    lines = [
        f"vtap apply file: parse + validate ({SESSIONS} sessions, half the flows named, each with a filter)",
        f"{env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        "GC paused during load and parse (as `vtap apply -f` does); the last column with Python's cyclic GC on",
        "",
        "   flows   libyaml load   parse+validate   total   total, GC on" + ("   pure-Python load" if args.pure_python else ""),
    ]
    for row in results:
        c = row["libyaml"]
        tail = f"   {row['pure_python']['load_s']:13.2f} s" if args.pure_python else ""
        lines.append(f"{row['flows']:8d}   {c['load_s']:10.2f} s   {c['parse_validate_s']:12.2f} s   {c['total_s']:5.2f} s   {row['libyaml_gc_on']['total_s']:9.2f} s{tail}")
    lines += ["", f"{largest['flows']} flows: {largest['libyaml']['total_s']:.2f} s, target <= {TARGET_S:g} s {'met' if met else 'NOT met'}; peak RSS {peak_mib:.0f} MiB"]
    text = "\n".join(lines)
    print("\n" + text)
    benchlib.save("parse_document", {"environment": env, "sessions": SESSIONS, "results": results, "target_s": TARGET_S, "peak_rss_mib": peak_mib}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
