"""The lab driver: a VM that moves to the other host takes its tap with it."""

import os
import subprocess
import sys
import threading
import time

import pytest
from pyroute2 import netns as pr_netns

from vtap_core.client import Client
from vtap_core.errors import NotFound, ValidationError
from vtap_core.follow import Follower
from vtap_drivers.lab import traffic
from vtap_drivers.lab.demo import frames_from
from vtap_drivers.lab.topology import vm_mac, vm_uuid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and tc filters")



def mirrored(lab, mon_port, sender=1, receiver=2, kind="tcp/80"):
    sniffer = traffic.Sniffer(lab.ns("mon"), mon_port)
    try:
        traffic.send(lab.ns(f"vm{sender}"), "eth0", frames_from(sender, receiver, kind, 10))
        return sniffer.settle()[(vm_mac(sender), kind)]
    finally:
        sniffer.close()


def vtap_filters(lab, host):
    out = subprocess.run(["ip", "netns", "exec", lab.ns(host), "tc", "filter", "show", "dev", "tap-vm1", "ingress"], capture_output=True, text=True)
    return out.stdout.count("mirred")


def test_inventory_and_bad_names(lab, state_path):
    with Client(driver="lab", state=state_path, prefix=lab.prefix) as client:
        vms = {vm.name: vm for vm in client.vms()}
        assert vms["vm1"].uuid == vm_uuid(lab.prefix, "vm1") and vms["vm3"].host == "host2"
        assert vms["vm1"].nics[0].device == "tap-vm1" and vms["vm1"].nics[0].mac == vm_mac(1)
        client.create_session("ids", to="port:mon0")
        with pytest.raises(NotFound, match="vm nosuch"):
            client.add_flow("ids", vm="nosuch")
        with pytest.raises(ValidationError, match="nic"):
            client.add_flow("ids", vm="vm1", nic="52:54:00:99:99:99")
        assert client.flows() == []


def test_moving_vm_moves_its_tap(lab, state_path):
    with Client(driver="lab", state=state_path, prefix=lab.prefix) as client:
        client.create_session("ids", to="port:mon0")
        client.add_flow("ids", vm=vm_uuid(lab.prefix, "vm1"), direction="out", filter="tcp port 80")
        assert mirrored(lab, "h1") == 10
        stop = threading.Event()
        follower = Follower(Client(driver="lab", state=state_path, prefix=lab.prefix), interval=30)
        thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
        thread.start()
        try:
            time.sleep(0.5)
            lab.move("vm1", "host2")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and vtap_filters(lab, "host2") == 0:
                time.sleep(0.05)
            assert vtap_filters(lab, "host2") == 1
            assert subprocess.run(["ip", "netns", "exec", lab.ns("host1"), "tc", "filter", "show"], capture_output=True, text=True).stdout == ""
            assert mirrored(lab, "h2") == 10
            assert mirrored(lab, "h1") == 0
            assert follower.resyncs == 1, "the move was followed from the event, not a periodic resync"
        finally:
            stop.set()
            thread.join(timeout=10)
        assert [row.state for row in client.status()] == ["active"]


def test_vtap_demo_passes_quickly_and_cleans_up():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vtap_cli.main", "demo"], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "BAD" not in result.stdout
    assert elapsed < 30
    assert not [name for name in pr_netns.listnetns() if name.startswith("vtapdemo-")]
