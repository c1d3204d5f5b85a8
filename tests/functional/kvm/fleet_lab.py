"""A fleet for the kvm tests and benchmarks: `vtap agent` per libvirt host, sharing one etcd member (tests/etcd_member.py).

Each agent is one "host" of the fleet: its own libvirtd, its own state dir
(the dataplane's catalog and locks), and nothing shared with the others but
etcd. Importable from bench/ too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def vtap_env(store: str, host: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
    env.update({"VTAP_STORE": store, "VTAP_HOST": host})
    return env


def vtap_command(state_dir: Path, uri: str, *args) -> list[str]:
    """`vtap --driver kvm` as one host of the fleet: its own state dir, its own libvirtd."""
    return [sys.executable, "-m", "vtap_cli.main", "--driver", "kvm", "--state", str(Path(state_dir) / "state.db"), "--uri", uri, *args]


def start_agent(store: str, host: str, state_dir: Path, uri: str, log: Path, interval: float = 120) -> subprocess.Popen:
    """`vtap agent` for one host; its log (stderr) goes to `log`."""
    command = vtap_command(state_dir, uri, "agent", "--interval", str(interval), "--ttl", "5")
    return subprocess.Popen(command, env=vtap_env(store, host), stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def stop_agent(agent: subprocess.Popen) -> None:
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


OPENING = 0.3  # seconds at the start of a counting window whose frames are not counted


def count_sent_and_copied(peer: str, counter: str, mac: str, seconds: float) -> dict:
    """Frames mac sent out of the bridge towards the peer, and the copies arriving on counter,
    for `seconds`: {"sent", "copied", "missed", "extra"}. Frames are matched by their bytes (a
    multiset), so a frame near either end of the window is not mistaken for a lost or doubled copy:
    missed = sent frames without a copy, extra = copies beyond one per sent frame. Start migrating
    later than OPENING seconds into the window."""
    import select
    from collections import Counter

    raw = bytes(int(x, 16) for x in mac.split(":"))
    seen = {peer: Counter(), counter: Counter()}
    early = Counter()  # frames sent in the first OPENING seconds, while the second socket was being opened
    when: dict = {}  # frame -> seconds into the window it was first seen
    socks = {}
    started = time.monotonic()

    def drain(sock, name, outgoing):
        while True:
            try:
                frame, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            if (addr[2] == socket.PACKET_OUTGOING) == outgoing and frame[6:12] == raw:
                at = time.monotonic() - started
                if name == peer and at < OPENING:
                    early[frame] += 1  # its copy may or may not have been seen: count neither
                else:
                    seen[name][frame] += 1
                    when.setdefault(frame, at)

    try:
        for name, outgoing in ((peer, True), (counter, False)):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            sock.bind((name, 0))
            sock.setblocking(False)
            socks[sock] = (name, outgoing)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(socks), [], [], min(left, 0.2))
            for sock in ready:
                drain(sock, *socks[sock])
        for sock, (name, outgoing) in socks.items():
            drain(sock, name, outgoing)
            if name == peer:
                time.sleep(0.5)  # the copies of the last originals may still be in a busy machine's backlog
    finally:
        for sock in socks:
            sock.close()
    sent, copies = seen[peer], seen[counter] - early
    return {
        "sent": sum(sent.values()),
        "copied": sum(min(n, copies[f]) for f, n in sent.items()),
        "missed": sum((sent - copies).values()),
        "extra": sum(max(0, copies[f] - n) for f, n in sent.items()),
        "missed_frames": [f"{when[f]:.2f}s {f[:48].hex()}" for f in (sent - copies)],  # what to look at when one is missed
    }
