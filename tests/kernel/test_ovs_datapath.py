"""OVS mirrors added while traffic already has cached datapath flows, on the kernel and userspace datapaths.

Settles the kvm README's "cached datapath flows" note. In the lane's guest
(Debian's kernel, so the openvswitch module exists):

    vm0 -- vm0p  [br0]  p1p -- p1      unicast both ways, before and after the Mirror is added
                        mon0p -- mon0  the Mirror's output port; copies counted on mon0

The Mirror row is made by vtap's own ovs backend (drivers/kvm/ovs.py), while
vm0 and p1 are already exchanging frames (so vswitchd has installed datapath
flows for them). Without vtap's purge of cached flows (ovsflows.py) OVS 3.1
copied nothing of that ongoing traffic here for 5 s, and at once after
`ovs-appctl dpctl/del-flows`: the README's note is real, not a quirk of the
userspace datapath. Copies must reach mon0 at once, and stop when removed.
"""

import os
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from .lane import lane_only

pytestmark = lane_only
ETH_P_ALL = 0x0003
MAC_VM, MAC_P1 = "02:00:00:00:0a:01", "02:00:00:00:0a:02"


def sh(*args, env=None):
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture
def ovs(tmp_path):
    """ovsdb-server + ovs-vswitchd in a temp dir of the guest."""
    run = tmp_path / "ovs"
    run.mkdir()
    env = dict(os.environ, OVS_RUNDIR=str(run), OVS_LOGDIR=str(run), OVS_DBDIR=str(run))
    subprocess.run(["modprobe", "openvswitch"], check=False)
    sh("ovsdb-tool", "create", str(run / "conf.db"), "/usr/share/openvswitch/vswitch.ovsschema")
    common = ["--detach", "--no-chdir", "--log-file", "-vconsole:off"]
    remote = f"unix:{run}/db.sock"
    sh("ovsdb-server", str(run / "conf.db"), f"--remote=punix:{run}/db.sock", f"--pidfile={run}/ovsdb-server.pid", *common, env=env)
    sh("ovs-vsctl", f"--db={remote}", "--no-wait", "init", env=env)
    sh("ovs-vswitchd", remote, f"--pidfile={run}/ovs-vswitchd.pid", *common, env=env)

    def vsctl(*args):
        return sh("ovs-vsctl", f"--db={remote}", "--timeout=20", *args, env=env)

    try:
        yield remote, vsctl
    finally:
        try:
            for bridge in vsctl("list-br").split():
                vsctl("--if-exists", "del-br", bridge)
        except subprocess.CalledProcessError:
            pass
        for name in ("ovs-vswitchd", "ovsdb-server"):
            try:
                os.kill(int((run / f"{name}.pid").read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        for dev in ("vm0", "p1", "mon0", "ovs-netdev"):
            subprocess.run(["ip", "link", "del", dev], capture_output=True)


def packet_socket(device):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((device, 0))
    return sock


@pytest.mark.parametrize("datapath", ["system"])
def test_a_mirror_added_under_cached_flows_copies_at_once(ovs, datapath):
    from vtap_drivers.kvm.ovs import Ovs, mirror_binding

    remote, vsctl = ovs
    vsctl("add-br", "br0", "--", "set", "Bridge", "br0", f"datapath_type={datapath}")
    for end, port in (("vm0", "vm0p"), ("p1", "p1p"), ("mon0", "mon0p")):
        sh("ip", "link", "add", end, "type", "veth", "peer", "name", port)
        for dev in (end, port):
            sh("ip", "link", "set", dev, "addrgenmode", "none")
            sh("ip", "link", "set", dev, "up")
        vsctl("add-port", "br0", port)
    marker = uuid.uuid4().hex.encode()
    to_p1 = bytes(Ether(src=MAC_VM, dst=MAC_P1) / IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=7, dport=7) / (marker + bytes(20)))
    to_vm = bytes(Ether(src=MAC_P1, dst=MAC_VM) / IP(src="10.9.0.2", dst="10.9.0.1") / UDP(sport=7, dport=7) / (marker + bytes(20)))
    stop = threading.Event()
    vm, p1 = packet_socket("vm0"), packet_socket("p1")

    def talk():
        while not stop.is_set():
            vm.send(to_p1)
            p1.send(to_vm)
            time.sleep(0.01)

    talker = threading.Thread(target=talk, daemon=True)
    talker.start()
    monitor = packet_socket("mon0")
    monitor.settimeout(0.2)
    backend = Ovs(remote)
    try:
        time.sleep(3)  # MACs learned, unicast datapath flows installed and in use
        appctl = ("ovs-appctl", "-t", _vswitchd_ctl(remote))
        flows = sh(*appctl, "dpif/dump-flows", "br0")
        assert "actions:" in flows, flows  # the datapath holds flows for the ongoing traffic
        drain(monitor, marker, 0.3)  # learning floods of the start: not what is counted
        binding = mirror_binding("s", "f", "vm", "br0", "vm0p", "both", "mon0p", None)
        backend.apply(binding)
        copies = drain(monitor, marker, 2.0)
        backend.remove(binding)
        drain(monitor, marker, 0.5)
        after_removal = drain(monitor, marker, 2.0)
    finally:
        stop.set()
        talker.join()
        backend.close()
        for sock in (vm, p1, monitor):
            sock.close()
    # 2 s of 100 frames/s each way: copies must be flowing, not waiting for a flow flush.
    assert copies > 50, f"{copies} copies reached the mirror output on the {datapath} datapath in 2 s"
    assert after_removal == 0, f"{after_removal} copies still arrived after the mirror was removed"


def _vswitchd_ctl(remote):
    rundir = remote[len("unix:"):].rsplit("/", 1)[0]
    (ctl,) = [os.path.join(rundir, name) for name in os.listdir(rundir) if name.startswith("ovs-vswitchd.") and name.endswith(".ctl")]
    return ctl


def drain(sock, marker, seconds):
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if marker in sock.recv(65535):
                count += 1
        except socket.timeout:
            pass
    return count
