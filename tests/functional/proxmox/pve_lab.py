"""A fake PVE cluster (fakepve over HTTPS on loopback) for the proxmox tests, and small helpers."""

import asyncio
import subprocess
import threading
import uuid

from fakepve import FakePve
from fakepve.certs import make_cert

PASSWORD = "secret"


class FakeCluster:
    """fakepve served on its own event loop in a thread; migrate() and friends run there."""

    def __init__(self, folder):
        self.cafile, keyfile, _ = make_cert(str(folder), hosts=("127.0.0.1",))
        self.pve = FakePve(user="root@pam", password=PASSWORD, host="127.0.0.1", port=0)
        self.pve.time_scale = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fakepve", daemon=True)
        self.thread.start()
        self.call(self.pve.start(self.cafile, keyfile))

    @property
    def url(self):
        return self.pve.url

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def later(self, coro):
        """Start a coroutine on the fake's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def migrate(self, vmid, target, secs=0):
        return self.call(self.pve.migrate(vmid, target, secs=secs))

    def add_vm(self, vmid, name, node, nics=1, status="running", uuid_=True, firewall=False):
        config = {f"net{i}": f"virtio=BC:24:11:{vmid // 100:02X}:{vmid % 100:02X}:{i:02X},bridge=vmbr0" + (",firewall=1" if firewall else "")
                  for i in range(nics)}
        if uuid_:
            config["smbios1"] = f"uuid={uuid.uuid5(uuid.NAMESPACE_DNS, f'vm{vmid}')}"
        return self.pve.add_vm(vmid, name, node=node, status=status, config=config)

    def add_ct(self, vmid, name, node, nics=1, status="running"):
        """An LXC container (no smbios1: its identity is the vmid), NICs as pve-container writes them."""
        config = {f"net{i}": f"name=eth{i},bridge=vmbr0,hwaddr=BC:24:11:{vmid // 100:02X}:{vmid % 100:02X}:{i:02X},ip=dhcp,type=veth"
                  for i in range(nics)}
        return self.pve.add_ct(vmid, name, node=node, status=status, config=config)

    def settings(self, node, **more):
        base = dict(url=self.url, user="root@pam", password=PASSWORD, cafile=self.cafile, node=node)
        base.update(more)
        return base

    def stop(self):
        self.call(self.pve.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def vm_uuid(vmid):
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"vm{vmid}"))


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def cli_env(cluster, node, tmp_path, **more):
    """The environment a `vtap --driver proxmox ...` run on `node` gets (secrets only here, never argv)."""
    import os

    config = tmp_path / "empty-config.toml"
    config.touch()
    env = dict(os.environ)
    env["PATH"] = f"{vtap_command(tmp_path).parent}:{env['PATH']}"
    env.update(
        VTAP_CONFIG=str(config),
        VTAP_DRIVER="proxmox",
        VTAP_STATE=str(tmp_path / f"state-{node}" / "state.db"),
        VTAP_PROXMOX_URL=cluster.url,
        VTAP_PROXMOX_USER="root@pam",
        VTAP_PROXMOX_PASSWORD=PASSWORD,
        VTAP_PROXMOX_CAFILE=cluster.cafile,
        VTAP_PROXMOX_NODE=node,
        VTAP_PROXMOX_SHARED_STATE=str(tmp_path / "pmxcfs" / "vtap" / "desired.json"),
    )
    env.update({k: str(v) for k, v in more.items()})
    return env


def vtap_command(tmp_path):
    """A `vtap` command running this checkout with this interpreter: the hookscript looks vtap up on PATH."""
    import sys
    from pathlib import Path

    path = Path(tmp_path) / "bin" / "vtap"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!/bin/sh\nexec {sys.executable} -m vtap_cli.main \"$@\"\n")
        path.chmod(0o755)
    return path


def vtap(env, *args, timeout=60):
    """Run the vtap command line; returns the CompletedProcess (text)."""
    import sys

    return subprocess.run([sys.executable, "-m", "vtap_cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout)


SEND_FRAMES = r"""
import socket, sys
ifname, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = bytes.fromhex("ffffffffffff" "bc2411000001" "88b5") + b"vtap-proxmox-test".ljust(46, b".")
for _ in range(count):
    s.send(frame)
"""


class NodeNamespace:
    """One PVE node's host side: tap<vmid>i<n> devices (veth; the peer plays the VM's NIC) and a
    monitoring port mon0 whose peer mon0p counts the copies that arrive."""

    def __init__(self, name):
        self.name = name
        sh("ip", "netns", "add", name)
        self.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        self.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "link", "add", "mon0", "type", "veth", "peer", "name", "mon0p")
        self.run("ip", "link", "set", "mon0", "up")
        self.run("ip", "link", "set", "mon0p", "up")

    def run(self, *args, check=True):
        return sh("ip", "netns", "exec", self.name, *args, check=check)

    def add_tap(self, vmid, index=0, firewall=False, prefix="tap"):
        """The tap PVE makes when the VM starts here (prefix "veth": a container's veth); with firewall=1,
        behind fwbr<vmid>i<n>."""
        tap, peer = f"{prefix}{vmid}i{index}", f"vm{vmid}i{index}"
        self.run("ip", "link", "add", tap, "type", "veth", "peer", "name", peer)
        for dev in (tap, peer):
            self.run("ip", "link", "set", dev, "up")
        if firewall:
            bridge = f"fwbr{vmid}i{index}"
            self.run("ip", "link", "add", bridge, "type", "bridge")
            self.run("ip", "link", "set", bridge, "up")
            self.run("ip", "link", "set", tap, "master", bridge)

    def del_tap(self, vmid, index=0):
        self.run("ip", "link", "del", f"tap{vmid}i{index}", check=False)
        self.run("ip", "link", "del", f"fwbr{vmid}i{index}", check=False)

    def send_from_vm(self, vmid, index=0, count=10):
        """Frames the VM sends (its `out` direction): they enter the host at tap<vmid>i<n>."""
        import sys

        self.run(sys.executable, "-c", SEND_FRAMES, f"vm{vmid}i{index}", str(count))

    def received(self):
        """Frames that reached the monitoring port (mon0 sends them, mon0p receives them)."""
        import json

        info = json.loads(self.run("ip", "-s", "-j", "link", "show", "mon0p").stdout)
        return info[0]["stats64"]["rx"]["packets"]

    def filters(self, device):
        return self.run("tc", "filter", "show", "dev", device, "ingress", check=False).stdout + \
            self.run("tc", "filter", "show", "dev", device, "egress", check=False).stdout

    def remove(self):
        sh("ip", "netns", "del", self.name, check=False)


def start_agent(env, interval):
    """`vtap agent` as a node runs it (until SIGTERM); stderr collected in a file for the log lines."""
    import sys
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen([sys.executable, "-m", "vtap_cli.main", "agent", "--interval", str(interval)],
                               env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log
    return process


def stop_agent(process):
    """SIGTERM, then the agent's exit code and log text."""
    process.terminate()
    code = process.wait(timeout=20)
    process.log.seek(0)
    return code, process.log.read()


def wait_for(predicate, timeout=15.0, step=0.05):
    """Seconds until predicate() was true; AssertionError after timeout."""
    import time

    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s: {predicate.__doc__ or predicate}")
        time.sleep(step)
    return time.monotonic() - started
