"""How long `vtap --help` takes, and which modules it imports on the way.

Wall time of the installed `vtap` console script (median of several runs;
target <= 0.3 s), and `python3 -X importtime` of the same command: whether
pyvmomi, libvirt, proxmoxer (or other driver libraries) got imported, and the
costliest top-level imports. Reports only; asserts nothing.

    python3 bench/help_time.py [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

TARGET_S = 0.3
# Import names of the driver libraries `vtap --help` must not load.
HEAVY = ("pyVmomi", "pyVim", "libvirt", "proxmoxer", "ovsdbapp", "requests", "prometheus_client")
HELP_SCRIPT = "import sys; from vtap_cli.main import main; sys.argv = ['vtap', '--help']; sys.exit(main())"


def wall_times(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
    return times


def import_profile() -> list[tuple[int, int, str, int]]:
    """[(self µs, cumulative µs, dotted name, nesting depth)] from -X importtime, in import order."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", HELP_SCRIPT], capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((int(own), int(cumulative), name.strip(), depth))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    env = benchlib.environment()
    # The console script itself (a pyenv shim in front of it would add its own start-up).
    beside_python = os.path.join(os.path.dirname(sys.executable), "vtap")
    vtap = beside_python if os.access(beside_python, os.X_OK) else shutil.which("vtap")
    command = [vtap, "--help"] if vtap else [sys.executable, "-c", HELP_SCRIPT]
    wall_times(command, 1)  # warm the page cache and .pyc files
    times = wall_times(command, args.runs)
    python_only = wall_times([sys.executable, "-c", "pass"], args.runs)
    profile = import_profile()
    names = [name for _, _, name, _ in profile]
    heavy = sorted({name for name in names for lib in HEAVY if name == lib or name.startswith(lib + ".")})
    top_level = sorted((row for row in profile if row[3] == 0), key=lambda row: -row[1])[:12]
    median = benchlib.median(times)
    lines = [
        f"`{' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(command))}`: median {median:.3f} s over {args.runs} runs (min {min(times):.3f}, max {max(times):.3f}); target <= {TARGET_S} s {'met' if median <= TARGET_S else 'NOT met'}",
        f"bare `python3 -c pass`: median {benchlib.median(python_only):.3f} s",
        f"{env['date']} commit {env['commit']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        f"driver libraries imported by --help: {', '.join(heavy) if heavy else 'none'} (checked: {', '.join(HEAVY)})",
        f"modules imported: {len(profile)}",
        "costliest top-level imports (cumulative ms):",
    ]
    lines += [f"  {cumulative / 1000:7.1f}  {name}" for _, cumulative, name, _ in top_level]
    text = "\n".join(lines)
    print(text)
    benchlib.save(
        "help_time",
        {
            "environment": env,
            "command": command,
            "runs_s": times,
            "median_s": median,
            "python_startup_median_s": benchlib.median(python_only),
            "target_s": TARGET_S,
            "heavy_imported": heavy,
            "modules_imported": len(profile),
            "top_imports_ms": [[name, cumulative / 1000] for _, cumulative, name, _ in top_level],
        },
        text,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
