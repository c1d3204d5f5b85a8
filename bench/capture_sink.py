"""What a pcap target's sink costs the mirrored traffic, and what another sink would buy.

Same topology as bench/capture.py (a C sender, 64-byte frames as fast as it
goes, peer0 -> src0; the ingress of src0 is what is captured), but the tc
filters are written here by hand and one reader, tcpdump -w, reads every
variant, so only the path from the source to the reader's ring differs:

  no-tap          nothing
  egress-sink     mirred egress mirror to an ifb with noqueue (vtap's sink today), nothing reading
  egress-read     the same, tcpdump -Q out on the ifb
  ingress-sink    mirred ingress mirror to an ifb whose own ingress drops everything (cls_bpf da, after the taps)
  ingress-read    the same, tcpdump -Q in on the ifb
  direct-read     no mirror: tcpdump -Q in on src0 itself (a packet socket on the source, as tcpdump -i does)
  act-bpf-ring    no clone: the filter's action is act_bpf (bench/actring.py) writing each frame into a
                  BPF ring buffer, read by bpfring.RingReader in a process of its own (on CPU 0, writing the file)
  da-ring         no clone, no act_bpf (kernels built without it): cls_bpf in direct-action mode running
                  tcxprog's ring-writing program (it returns TC_ACT_UNSPEC: later filters still run), same reader
  tcx-ring        the same program on src0's tcx ingress hook (datapath=tcx's pcap path), same reader
  da-noop         a direct-action cls_bpf whose program matches nothing: what the tc hook alone costs

Per variant: the traffic's frames/s through src0 and its ratio to no-tap, and
the reader's completeness (frames in its file / frames through src0). The
sender runs on the last CPU, tcpdump on CPU 0, both at nice -10.

    python3 bench/capture_sink.py [--rounds 3] [--seconds 2]     (root; tcpdump, capinfos, cc)

Writes results/capture_sink.json and .txt.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import benchlib
from capture import CAPTURE_CPU, Lab

MATCH_ALL = "1,6 0 0 262144,"  # cBPF: accept the whole frame
DROP_ALL = "1,6 0 0 2,"
NO_MATCH = ((0x80, 0, 0, 0), (0x15, 0, 1, 0xFFFFFFFF), (0x06, 0, 0, 262144), (0x06, 0, 0, 0))  # len == 2^32-1: never (and not dead code to the verifier)  # cBPF in direct-action mode: TC_ACT_SHOT
VARIANTS = ("no-tap", "egress-sink", "egress-read", "ingress-sink", "ingress-read", "direct-read", "act-bpf-ring", "da-ring", "tcx-ring", "da-noop")
RING_READER = """
import signal, sys, time
from vtap_drivers.linux import bpfring
reader, frames, stop = bpfring.RingReader(sys.argv[1]), 0, []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
print("reading", flush=True)
with open(sys.argv[2], "wb") as out:
    while True:
        parts, count = reader.read()
        out.writelines(parts)
        reader.release()
        frames += count
        if stop and not reader.available():
            break
        if not reader.available():
            time.sleep(0.005)  # as capture.record_sink: gather a batch, no wakeup per frame
print(frames, flush=True)
"""


def tc(lab: Lab, *words, check=True):
    return benchlib.run("tc", "-n", lab.b, *words, check=check)


def set_variant(lab: Lab, variant: str) -> None:
    from vtap_drivers.linux import bpfsys, tcxmirror

    if getattr(lab, "tcx_link", None) is not None:
        lab.tcx_link.close()  # not pinned: closing detaches it
        lab.tcx_link = None
    if variant == "tcx-ring":
        with tcxmirror.in_netns(lab.b), bpfsys.get_pinned(os.path.join(lab.pins, "cls")) as prog:
            lab.tcx_link = bpfsys.attach_tcx(prog, socket.if_nametoindex("src0"), "ingress")
    for device in ("src0", "mon0"):
        tc(lab, "filter", "del", "dev", device, "ingress", check=False)
    if variant.startswith("egress"):
        tc(lab, "filter", "add", "dev", "src0", "ingress", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "egress", "mirror", "dev", "mon0")
    elif variant.startswith("ingress"):
        tc(lab, "filter", "add", "dev", "mon0", "ingress", "bpf", "da", "bytecode", DROP_ALL)
        tc(lab, "filter", "add", "dev", "src0", "ingress", "bpf", "bytecode", MATCH_ALL, "action", "mirred", "ingress", "mirror", "dev", "mon0")
    elif variant == "act-bpf-ring":
        # nsenter, not tc -n: that remounts /sys, and the pins are in the bpffs under it
        benchlib.run("nsenter", f"--net=/run/netns/{lab.b}", "tc", "filter", "add", "dev", "src0", "ingress", "bpf", "bytecode", MATCH_ALL, "action", "bpf", "object-pinned", os.path.join(lab.pins, "prog"))
    elif variant in ("da-ring", "da-noop"):
        pin = os.path.join(lab.pins, "cls" if variant == "da-ring" else "noop")
        benchlib.run("nsenter", f"--net=/run/netns/{lab.b}", "tc", "filter", "add", "dev", "src0", "ingress", "bpf", "da", "object-pinned", pin)


def pin_ring_action(lab: Lab) -> None:
    """The ring and the programs writing into it (act_bpf's, cls_bpf's), pinned where tc and the reader find them."""
    import actring
    from vtap_drivers.linux import bpfring, bpfsys, tcxprog

    bpfsys.ensure_bpffs()
    lab.pins = f"/sys/fs/bpf/vtapbsink{os.getpid()}"
    os.makedirs(lab.pins, mode=0o700)
    bpfring.ensure(os.path.join(lab.pins, "ring"))
    with bpfsys.get_pinned(os.path.join(lab.pins, "ring")) as ring:
        with tcxprog.load_mirror(actring.MATCH_ALL, 0, "bench", ring=tcxprog.RingAction(ring.fileno(), None, bpfring.DIRECTION_IN)) as cls:
            bpfsys.pin(cls.prog, os.path.join(lab.pins, "cls"))
        with tcxprog.load_mirror(NO_MATCH, 0, "noop", ring=tcxprog.RingAction(ring.fileno(), None, bpfring.DIRECTION_IN)) as noop:
            bpfsys.pin(noop.prog, os.path.join(lab.pins, "noop"))
        with actring.load(ring, None, bpfring.DIRECTION_IN) as action:
            bpfsys.pin(action.prog, os.path.join(lab.pins, "prog"))
    probe = benchlib.run("nsenter", f"--net=/run/netns/{lab.b}", "tc", "actions", "add", "action", "bpf", "object-pinned", os.path.join(lab.pins, "prog"), "index", "77", check=False)
    lab.no_act_bpf = probe.stderr.strip().splitlines()[0] if probe.returncode else None
    benchlib.run("nsenter", f"--net=/run/netns/{lab.b}", "tc", "actions", "del", "action", "bpf", "index", "77", check=False)


def run_one(lab: Lab, variant: str, seconds: float) -> dict:
    set_variant(lab, variant)
    reader = None
    path = os.path.join(lab.workdir, "read.pcap")
    if variant.endswith("-ring"):
        command = benchlib.pinned(CAPTURE_CPU, sys.executable, "-c", RING_READER, os.path.join(lab.pins, "ring"), path)
        reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        reader.stdout.readline()  # "reading"
    elif variant.endswith("-read"):
        device, direction = ("src0", "in") if variant == "direct-read" else ("mon0", "out" if variant.startswith("egress") else "in")
        command = benchlib.pinned(CAPTURE_CPU, "ip", "netns", "exec", lab.b, "tcpdump", "-i", device, "-Q", direction, "-n", "-w", path)
        reader = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        reader.stderr.readline()  # "listening on ..."
        time.sleep(0.5)
    before = lab.rx()
    _sent, elapsed = lab.send(0, seconds, 64)
    time.sleep(1.2)  # tcpdump hands over what it buffered (1 s timeout)
    through = lab.rx() - before
    row = {"variant": variant, "through_source": through, "pps": through / elapsed}
    if reader is not None:
        reader.send_signal(signal.SIGINT)
        out, _ = reader.communicate(timeout=20)
        frames = int(out) if variant.endswith("-ring") else benchlib.frames_in(path)
        os.unlink(path)
        row.update(frames=frames, completeness=frames / through if through else None)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--name", default="capture_sink", help="results/NAME.json and .txt")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    variants = tuple(args.variants.split(","))
    if os.geteuid() != 0:
        print("bench/capture_sink.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    env = benchlib.environment()
    workdir = tempfile.mkdtemp(prefix="vtapbsink-")
    lab = Lab(workdir)
    runs, notes = [], []
    try:
        lab.build()
        tc(lab, "qdisc", "add", "dev", "src0", "clsact")
        tc(lab, "qdisc", "add", "dev", "mon0", "clsact")
        pin_ring_action(lab)
        if lab.no_act_bpf and "act-bpf-ring" in variants:
            variants = tuple(v for v in variants if v != "act-bpf-ring")
            notes.append(f"act-bpf-ring not run: this kernel has no act_bpf (tc: {lab.no_act_bpf})")
            print(notes[-1], flush=True)
        for round_number in range(args.rounds):
            for variant in variants if round_number % 2 == 0 else variants[::-1]:
                row = run_one(lab, variant, args.seconds)
                runs.append(row)
                extra = f", {100 * row['completeness']:.2f}% complete" if "completeness" in row else ""
                print(f"round {round_number + 1} {variant:<13} {row['pps']:,.0f} frames/s{extra}", flush=True)
    finally:
        lab.destroy()
        subprocess.run(["rm", "-rf", workdir])
        if getattr(lab, "pins", None):
            subprocess.run(["rm", "-rf", lab.pins])
    base = benchlib.median([r["pps"] for r in runs if r["variant"] == "no-tap"])
    summary = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        pps = benchlib.median([r["pps"] for r in mine])
        summary[variant] = {"pps": pps, "vs_no_tap": pps / base, "completeness": benchlib.median([r.get("completeness") for r in mine])}
    lines = [
        "the sink of a pcap target: 64-byte frames as fast as the sender goes, src0's ingress captured, tcpdump -w reading each variant",
        f"{args.rounds} round(s) x {args.seconds} s; medians. {env['date']} commit {env['commit']}, kernel {env['kernel']}, {env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f}",
        "",
        *(notes + [""] if notes else []),
        f"{'variant':<13} {'frames/s':>10} {'vs no-tap':>9} {'complete':>9}",
    ]
    for variant, f in summary.items():
        complete = "-" if f["completeness"] is None else f"{100 * f['completeness']:.2f}%"
        lines.append(f"{variant:<13} {f['pps']:>10,.0f} {f['vs_no_tap']:>9.2f} {complete:>9}")
    text = "\n".join(lines)
    print("\n" + text)
    benchlib.save(args.name, {"environment": env, "rounds": args.rounds, "seconds": args.seconds, "variants": variants, "summary": summary, "runs": runs}, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
