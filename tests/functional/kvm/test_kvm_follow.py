"""`vtap follow` keeps a tap right on a real guest: NIC hot-plug and unplug,
destroy + start (a new vnetN), libvirtd restarting while the VM is killed and
started again. Checked in the kernel (tc filters on the new devices), with
frames counted at the end, and in the Prometheus metrics."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")

from .kvm_lab import host_devices, sh, wait_for, wait_sending
from . import kvm_lab as lab


def vtap(host, state, *args):
    run = subprocess.run(["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(state), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def mirrored(device: str, hook: str = "ingress") -> bool:
    try:
        return "mirred" in sh(f"tc filter show dev {device} {hook}")
    except subprocess.CalledProcessError:
        return False  # no such device (yet)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def qemu_pid(host, dom) -> int:
    return int((host.dir / "run" / "qemu" / f"{dom.name()}.pid").read_text())


def test_follow_keeps_the_tap_through_hotplug_restarts_and_libvirtd_restart(libvirt_host, lan, guests, tmp_path):
    host, state = libvirt_host, tmp_path / "s.db"
    dom, (mac,) = guests.start(lan, 20)
    (first,) = host_devices(dom)
    wait_sending(first)  # booted: ACPI hot-unplug needs the guest's cooperation
    vtap(host, state, "session", "create", "web", "--to", f"port:{lan.monitor}")
    vtap(host, state, "flow", "add", "web", "--vm", dom.UUIDString(), "--direction", "out")
    assert mirrored(first)

    port = free_port()
    log = open(tmp_path / "follow.log", "w")
    follower = subprocess.Popen(
        ["vtap", "--driver", "kvm", "--uri", host.uri, "--state", str(state), "follow", "--interval", "120", "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _up(port), 20, "the follower's metrics endpoint")

        # Hot-plug a second NIC: the flow has no --nic, so it covers it too.
        nic2 = "52:54:00:77:00:02"
        nic_xml = lab.interface_xml(nic2, lan.bridge)
        dom.attachDeviceFlags(nic_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        second = host_devices(dom)[1]
        wait_for(lambda: mirrored(second), 20, f"the follower to mirror hot-plugged {second}")
        # ...and unplug it: the device and its filters are gone, the flow stays active on the first NIC.
        dom.detachDeviceFlags(nic_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        wait_for(lambda: not os.path.exists(f"/sys/class/net/{second}"), 30, f"{second} to be unplugged")
        assert mirrored(first)

        # destroy + start: a new vnetN, mirrored by the follower.
        dom.destroy()
        dom.create()
        (restarted,) = host_devices(dom)
        assert restarted != first
        wait_for(lambda: mirrored(restarted), 20, f"the follower to mirror {restarted} after destroy + start")

        # libvirtd goes away; the VM is killed meanwhile and started again once libvirtd is back.
        host.stop()
        os.kill(qemu_pid(host, dom), signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/sys/class/net/{restarted}"), 10, "the killed guest's device to go")
        time.sleep(2)  # long enough for keepalive to declare the connection dead
        host.start()
        dom = host.connect().lookupByUUIDString(dom.UUIDString())
        wait_for(lambda: not dom.isActive(), 10, "libvirtd to notice the guest died")
        dom.create()
        (final,) = host_devices(dom)
        wait_for(lambda: mirrored(final), 30, f"the follower to mirror {final} after libvirtd came back")

        wait_sending(final)
        counts = lab.count_frames(lan.counter, mac, 15, until=("out", 5))
        assert counts["out"] >= 5 and counts["in"] == 0, counts
        assert metric(port, "vtap_reconnects_total") >= 1
        assert metric(port, "vtap_follow_latency_seconds_count") >= 2
        status = json.loads(vtap(host, state, "status", "-o", "json"))
        assert [r["state"] for r in status] == ["active"]
    finally:
        follower.send_signal(signal.SIGTERM)
        code = follower.wait(20)
        log.close()
    assert code == 0, (tmp_path / "follow.log").read_text()


def _up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)
        return True
    except OSError:
        return False
