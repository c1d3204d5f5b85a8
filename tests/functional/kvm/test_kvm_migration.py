"""Live migration between two libvirtd "hosts" on one machine (own config, state,
sockets and host_uuid; one network namespace, so both hosts' vnet devices sit on
the same bridge). A follower per host, sharing one store as hosts share desired
state: the destination's follower mirrors the incoming VM's new device, the
source's mirror goes with the source device. Frames the guest sent during the
move are counted twice, at the peer and at the mirror port: the difference is
what the tap missed."""

import signal
import subprocess
import threading
import time

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")

from .kvm_lab import host_devices, sh, wait_for, wait_sending
from . import kvm_lab as lab


def mirrored(device: str) -> bool:
    try:
        return "mirred" in sh(f"tc filter show dev {device} ingress")
    except subprocess.CalledProcessError:
        return False


@pytest.fixture
def second_host(kvm_workdir, ovs):
    host = lab.LibvirtHost(kvm_workdir, f"host2-{time.monotonic_ns() % 100000}", ovs_rundir=ovs.dir).start()
    yield host
    host.close()


def test_live_migration_moves_the_tap(libvirt_host, second_host, lan, guests, tmp_path):
    src, dst = libvirt_host, second_host
    dom, (mac,) = guests.start(lan, 30)
    uuid = dom.UUIDString()
    (before,) = host_devices(dom)
    wait_sending(before)
    state = tmp_path / "shared.db"
    cli = ["vtap", "--driver", "kvm", "--state", str(state)]
    subprocess.run([*cli, "--uri", src.uri, "session", "create", "mig", "--to", f"port:{lan.monitor}"], check=True, capture_output=True)
    subprocess.run([*cli, "--uri", src.uri, "flow", "add", "mig", "--vm", uuid, "--direction", "out"], check=True, capture_output=True)
    assert mirrored(before)
    followers = [
        subprocess.Popen([*cli, "--uri", host.uri, "follow", "--interval", "120"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"follow-{host.name}.log", "w"))
        for host in (src, dst)
    ]
    try:
        time.sleep(3)  # both followers did their first resync
        sent, copied = {}, {}
        counting = [
            threading.Thread(target=lambda: sent.update(lab.count_frames(lan.peer, mac, 25, outgoing=True))),
            threading.Thread(target=lambda: copied.update(lab.count_frames(lan.counter, mac, 25))),
        ]
        for thread in counting:
            thread.start()
        time.sleep(2)
        dconn = dst.connect()
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        started = time.monotonic()
        moved = dom.migrate(dconn, flags, None, "tcp://127.0.0.1", 0)
        took = time.monotonic() - started
        (after,) = host_devices(moved)
        wait_for(lambda: mirrored(after), 10, f"the destination's follower to mirror {after}")
        for thread in counting:
            thread.join()
        assert not src.connect().listAllDomains(), "the source still has the VM"
        missed = sent["out"] - copied["out"]
        print(f"\nmigration took {took:.1f} s; guest frames {sent['out']}, copies {copied['out']}, missed {missed}")
        (tmp_path.parent / "migration-figures.txt").write_text(f"took_s={took:.2f} sent={sent['out']} copied={copied['out']} missed={missed}\n")
        assert sent["out"] >= 20
        assert missed <= 2, (sent, copied)
    finally:
        for follower in followers:
            follower.send_signal(signal.SIGTERM)
            follower.wait(20)
