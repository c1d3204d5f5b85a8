"""bench/capture_sink.py inside the stock-kernel lane's guest (tests/kernel/lane.py), whose kernel has act_bpf.

This machine's kernel is built without act_bpf (CONFIG_NET_ACT_BPF unset), so
capture_sink.py's act-bpf-ring variant cannot run on it. The lane boots Debian's
kernel (/boot/vmlinuz-*, act_bpf a module) in QEMU with the host's root over 9p
and runs capture_sink.py there. The guest is emulated (TCG: nested KVM hangs
here), so its frames/s are nothing like the host's: only its variants' ratios
to each other say something (what each costs per frame, relative to the rest).

    python3 bench/capture_sink_lane.py [--accel tcg|kvm] [capture_sink.py arguments ...]   (root)

Writes results/capture_sink_lane.json and .txt.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from tests.kernel import lane  # noqa: E402

NAME = "capture_sink_lane"


def main() -> int:
    args = sys.argv[1:]
    accel = "tcg"
    if args[:1] == ["--accel"]:
        accel, args = args[1], args[2:]
    if os.geteuid() != 0:
        print("bench/capture_sink_lane.py needs root (the guest shares the host's root file system)", file=sys.stderr)
        return 2
    kernel = lane.kernel_path()
    if kernel is None:
        print("no /boot/vmlinuz-*: scripts/setup --test installs linux-image-amd64", file=sys.stderr)
        return 2
    results = Path(tempfile.mkdtemp(prefix="vtapblane-"))
    command = [sys.executable, str(HERE / "capture_sink.py"), "--name", NAME, *args]
    script = lane.run_script([])
    pytest_line = script.splitlines()[-2]  # the guest runs this bench instead of pytest
    script = script.replace(pytest_line, f"VTAP_BENCH_RESULTS=/run/results {shlex.join(command)} > /run/results/pytest.log 2>&1")
    original, os.environ["VTAP_LANE_ACCEL"] = lane.run_script, accel
    lane.run_script = lambda _args: script
    try:
        rc, log, console = lane.boot(results, [], timeout=1800)
        print(log)
        if rc != 0:
            print(f"the guest's bench failed (exit {rc})\n{console[-3000:]}", file=sys.stderr)
            return 1
        text = (results / f"{NAME}.txt").read_text()
        note = f"in the stock-kernel lane's guest: {kernel.name}, QEMU accel {accel} (emulated: compare the variants with each other only)\n"
        (HERE / "results" / f"{NAME}.txt").write_text(note + text)
        shutil.copy(results / f"{NAME}.json", HERE / "results" / f"{NAME}.json")
        print(f"written: bench/results/{NAME}.json, bench/results/{NAME}.txt")
        return 0
    finally:
        lane.run_script = original
        shutil.rmtree(results, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
