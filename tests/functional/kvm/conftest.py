"""Fixtures of the kvm tests: one libvirtd and one Open vSwitch for the whole run, and
per test a bridge with a peer to ping, a monitor port to count copies on, and guests."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass

import pytest

import kvm_lab as lab

_subnets = itertools.count(1)


def _require():
    if os.geteuid() != 0:
        pytest.skip("needs root: starts libvirtd, QEMU, Open vSwitch and creates bridges")
    for tool in ("libvirtd", "qemu-system-x86_64", "ovs-vswitchd", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: run scripts/setup --test")
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors are raised anyway; don't print them too


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def kvm_workdir(tmp_path_factory):
    _require()
    return tmp_path_factory.mktemp("vtapkvm")


@pytest.fixture(scope="session")
def ovs(kvm_workdir):
    daemons = lab.OvsDaemons(kvm_workdir).start()
    yield daemons
    daemons.stop()


@pytest.fixture(scope="session")
def libvirt_host(kvm_workdir, ovs):
    host = lab.LibvirtHost(kvm_workdir, "host1", ovs_rundir=ovs.dir).start()
    yield host
    host.close()


@dataclass
class Lan:
    """A bridge the guests plug into, a peer they ping, and a monitor port copies go to."""

    bridge: str
    subnet: str  # first three octets
    peer: str  # the bridge port towards the peer
    monitor: str  # the target port (port:monitor)
    counter: str  # where copies come out, to count
    netns: str

    def ip(self, n: int) -> str:
        return f"{self.subnet}.{n}"


def _veth(a: str, b: str):
    sh(f"ip link add {a} type veth peer name {b}")
    for name in (a, b):
        sh(f"sysctl -qw net.ipv6.conf.{name}.disable_ipv6=1 || true")


@contextlib.contextmanager
def make_lan(ovs=None):
    """A bridge (Linux, or OVS with the userspace datapath), a peer in a namespace of its own
    that the guests ping, and a monitor veth pair: copies sent to `monitor` come out of `counter`."""
    from pyroute2 import netns as pr_netns

    tag = uuidlib.uuid4().hex[:6]
    netns = f"vtapt-kvm{tag}"
    subnet = f"10.{234 if ovs else 233}.{next(_subnets) % 250}"
    bridge, peer, monitor, counter = f"vtk{'o' if ovs else 'b'}{tag}", f"vtkp{tag}", f"vtkm{tag}", f"vtkc{tag}"
    pr_netns.create(netns)
    try:
        if ovs:
            ovs.vsctl("add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev")
        else:
            sh(f"ip link add {bridge} type bridge && ip link set {bridge} up")
            sh(f"sysctl -qw net.ipv6.conf.{bridge}.disable_ipv6=1 || true")
        _veth(peer, "vtkpeer0")
        sh(f"ip link set vtkpeer0 netns {netns} && ip link set {peer} up")
        sh(f"ip -n {netns} addr add {subnet}.1/24 dev vtkpeer0 && ip -n {netns} link set vtkpeer0 up")
        _veth(monitor, counter)
        sh(f"ip link set {monitor} up && ip link set {counter} up")
        if ovs:
            ovs.vsctl("add-port", bridge, peer, "--", "add-port", bridge, monitor)
        else:
            sh(f"ip link set {peer} master {bridge}")
        yield Lan(bridge, subnet, peer, monitor, counter, netns)
    finally:
        if ovs:
            ovs.vsctl("--if-exists", "del-br", bridge)
        for name in (bridge, peer, monitor):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        pr_netns.remove(netns)


@pytest.fixture
def lan(kvm_workdir):
    with make_lan() as made:
        yield made


@pytest.fixture
def ovs_lan(ovs):
    with make_lan(ovs) as made:
        yield made


class Guests:
    """Defines and starts tiny guests on one host; destroys and undefines them afterwards."""

    def __init__(self, host: lab.LibvirtHost, workdir):
        self.host = host
        self.workdir = workdir
        self.conn = host.connect()
        self.uuids = []

    def start(self, lan: Lan, n: int, nics: int = 1, ovs: bool = False, name: str | None = None):
        uuid = str(uuidlib.uuid4())
        name = name or f"vtk-{uuid[:8]}"
        macs = [f"52:54:00:{n:02x}:{int(lan.subnet.split('.')[2]):02x}:{i:02x}" for i in range(nics)]
        xml = lab.domain_xml(name, uuid, macs, lan.bridge, lan.ip(n), lan.ip(1), self.workdir, ovs=ovs)
        dom = self.conn.defineXML(xml)
        self.uuids.append(uuid)
        dom.create()
        return dom, macs

    def define_without_nics(self, lan: Lan):
        uuid = str(uuidlib.uuid4())
        dom = self.conn.defineXML(lab.domain_xml(f"vtk-{uuid[:8]}", uuid, [], lan.bridge, lan.ip(9), lan.ip(1), self.workdir))
        self.uuids.append(uuid)
        return dom

    def close(self):
        conn = self.host.connect()
        for uuid in self.uuids:
            try:
                dom = conn.lookupByUUIDString(uuid)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except Exception:
                pass
        conn.close()


@pytest.fixture
def guests(libvirt_host, kvm_workdir):
    made = Guests(libvirt_host, kvm_workdir)
    yield made
    made.close()


@pytest.fixture(scope="module")
def module_guests(libvirt_host, kvm_workdir):
    """Guests shared by the tests of one module (a boot under TCG takes 10-20 s)."""
    made = Guests(libvirt_host, kvm_workdir)
    yield made
    made.close()


def host_devices(dom) -> list[str]:
    import xml.etree.ElementTree as ET

    return [t.get("dev") for t in ET.fromstring(dom.XMLDesc()).findall("./devices/interface/target")]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_sending(device: str, timeout: float = 60.0):
    """Until the guest behind this host device has sent frames (it has booted)."""
    path = f"/sys/class/net/{device}/statistics/rx_packets"
    wait_for(lambda: os.path.exists(path) and int(open(path).read()) > 2, timeout, f"guest traffic on {device}", 0.2)
