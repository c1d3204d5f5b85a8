"""Real libvirt hosts and tiny guests for the kvm tests.

LibvirtHost runs its own libvirtd in a private mount namespace: /etc/libvirt,
/var/lib/libvirt, /run/libvirt ... are bind mounts of a temp dir, so two hosts
(and a system libvirtd, if any) never share state; the socket lives outside
the namespace so the tests and vtap can connect with ?socket=.

The guest is a Debian kernel booted directly with a busybox initramfs whose
/init brings every ethN up and, forever, pings a peer from eth0 and arpings
it from every other NIC, so frames sent and received by the guest can be
counted on the host.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from initramfs import cpio_newc, load_order  # tests/initramfs.py (tests/ is on the path: tests/conftest.py)

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "kvm"
LIBVIRT_DIRS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "run": "/run/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
GUEST_MODULES = ("virtio_pci", "virtio_net")  # with their dependencies, from modules.dep
GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
while read -r m; do insmod "/lib/modules/$m"; done < /lib/modules/order
arg() { sed -n "s/.*vtap\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
IP=$(arg ip); PEER=$(arg peer)
echo "vtap-guest: ip=$IP peer=$PEER"
while true; do
  for dev in /sys/class/net/eth*; do
    name=${dev##*/}
    ip link set "$name" up 2>/dev/null
    if [ "$name" = eth0 ]; then
      ip addr show eth0 | grep -q "inet " || ip addr add "$IP/24" dev eth0
      ping -c 1 -W 1 "$PEER" >/dev/null 2>&1
    else
      arping -c 1 -w 1 -s "$IP" -I "$name" "$PEER" >/dev/null 2>&1
    fi
  done
  sleep 0.2
done
"""


def kernel_path() -> Path:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        raise RuntimeError("no /boot/vmlinuz-*: run scripts/setup --test (installs linux-image-amd64)")
    return Path(kernels[-1])


def guest_image() -> tuple[str, str]:
    """(kernel, initramfs) paths; the initramfs is built once and cached under tests/.cache/kvm."""
    kernel = kernel_path()
    release = kernel.name[len("vmlinuz-"):]
    initrd = CACHE / f"initrd-{release}-{hashlib.sha256((GUEST_INIT + repr(GUEST_MODULES)).encode()).hexdigest()[:12]}.gz"
    if not initrd.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        entries = [(d, 0o40755, b"") for d in ("bin", "proc", "sys", "dev", "lib", "lib/modules")]
        entries.append(("init", 0o100755, GUEST_INIT.encode()))
        entries.append(("bin/busybox", 0o100755, Path(shutil.which("busybox") or "/bin/busybox").read_bytes()))
        entries.append(("bin/sh", 0o120777, b"busybox"))
        order = []
        for module in load_order(release, GUEST_MODULES):
            name = os.path.basename(module)
            entries.append((f"lib/modules/{name}", 0o100644, Path(f"/lib/modules/{release}/{module}").read_bytes()))
            order.append(name)
        entries.append(("lib/modules/order", 0o100644, ("\n".join(order) + "\n").encode()))
        entries.append(("dev/console", 0o20600, b""))  # the kernel needs it for /init's stdio
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=1))
        tmp.rename(initrd)
    return str(kernel), str(initrd)


def metadata_xml(tags) -> str:
    """vtap's tags element (drivers/kvm/domains.py VTAP_NS), as `virsh metadata --key vtap` writes it."""
    return "<tags>" + "".join(f"<tag>{t}</tag>" for t in tags) + "</tags>"


def domain_xml(name, uuid, macs, bridge, ip, peer, workdir, ovs=False, tags=()) -> str:
    kernel, initrd = guest_image()
    nics = "".join(interface_xml(mac, bridge, ovs) for mac in macs)
    metadata = metadata_xml(tags).replace("<tags>", "<vtap:tags xmlns:vtap='urn:vtap:1'>").replace("<tag>", "<vtap:tag>").replace("</tag>", "</vtap:tag>").replace("</tags>", "</vtap:tags>")
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid><metadata>{metadata}</metadata>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet mitigations=off no_timer_check i8042.noaux i8042.nokbd vtap.ip={ip} vtap.peer={peer}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>{nics}
    <serial type='file'><source path='{workdir}/{name}.console'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>"""


def interface_xml(mac, bridge, ovs=False) -> str:
    virtualport = "<virtualport type='openvswitch'/>" if ovs else ""
    return (f"<interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/>"
            f"{virtualport}<model type='virtio'/><rom enabled='no'/></interface>")


class LibvirtHost:
    """One libvirtd with its own state, started and stopped by the tests."""

    def __init__(self, workdir: Path, name: str = "host1", ovs_rundir: Path | None = None):
        self.name = name
        self.ovs_rundir = ovs_rundir  # libvirt runs ovs-vsctl for <virtualport type='openvswitch'/>
        self.dir = Path(workdir) / name
        self.socket = self.dir / "sock" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.host_uuid = str(uuidlib.uuid4())
        self.proc = None

    def _write_config(self):
        for sub in list(LIBVIRT_DIRS) + ["sock"]:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "etc" / "libvirtd.conf").write_text(f"""
unix_sock_dir = "{self.dir}/sock"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{self.dir}/libvirtd.log"
host_uuid = "{self.host_uuid}"
keepalive_interval = 2
keepalive_count = 2
""")
        # QEMU as root without cgroups, namespaces or virtlogd: there is no systemd here.
        (self.dir / "etc" / "qemu.conf").write_text("""
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
""")

    def start(self, timeout=20.0):
        self._write_config()
        mounts = []
        for sub, path in LIBVIRT_DIRS.items():
            os.makedirs(path, exist_ok=True)
            mounts.append(f"mount --bind {self.dir / sub} {path}")
        if self.ovs_rundir:
            os.makedirs("/run/openvswitch", exist_ok=True)
            mounts.append(f"mount --bind {self.ovs_rundir} /run/openvswitch")
        script = " && ".join(mounts) + f" && exec libvirtd --config {self.dir}/etc/libvirtd.conf --pid-file {self.dir}/libvirtd.pid"
        log = open(self.dir / "libvirtd.out", "ab")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited: see {self.dir}/libvirtd.log")
            if self.socket.exists():
                try:
                    self.connect().close()
                    return self
                except Exception:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"libvirtd did not start in {timeout}s: see {self.dir}/libvirtd.log")

    def connect(self):
        import libvirt

        return libvirt.open(self.uri)

    def stop(self):
        """Stop libvirtd only: running guests (QEMU processes) stay up, as with a daemon restart."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.socket.exists():
            self.socket.unlink()

    def destroy_all(self):
        """Destroy and undefine every domain of this host (teardown)."""
        if not self.proc:
            return
        conn = self.connect()
        try:
            for dom in conn.listAllDomains():
                try:
                    if dom.isActive():
                        dom.destroy()
                except Exception:
                    pass
                try:
                    dom.undefine()
                except Exception:
                    pass
        finally:
            conn.close()

    def close(self):
        self.destroy_all()
        self.stop()


class OvsDaemons:
    """ovsdb-server + ovs-vswitchd (userspace datapath) with everything in one temp dir."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir) / "ovs"
        self.remote = f"unix:{self.dir}/db.sock"
        self.env = dict(os.environ, OVS_RUNDIR=str(self.dir), OVS_LOGDIR=str(self.dir), OVS_DBDIR=str(self.dir))

    def start(self):
        # One userspace datapath per network namespace: its device is "ovs-netdev".
        if os.path.exists("/sys/class/net/ovs-netdev"):
            if _running("ovs-vswitchd"):
                raise RuntimeError("another ovs-vswitchd (netdev datapath) runs in this namespace")
            subprocess.run(["ip", "link", "del", "ovs-netdev"], capture_output=True)  # left by a killed run
        self.dir.mkdir(parents=True, exist_ok=True)
        db = self.dir / "conf.db"
        if not db.exists():
            subprocess.run(["ovsdb-tool", "create", str(db), "/usr/share/openvswitch/vswitch.ovsschema"], check=True)
        common = ["--detach", "--no-chdir", "--log-file", "-vconsole:off"]
        subprocess.run(["ovsdb-server", str(db), f"--remote=punix:{self.dir}/db.sock", f"--pidfile={self.dir}/ovsdb-server.pid", *common], check=True, env=self.env)
        self.vsctl("--no-wait", "init")
        subprocess.run(["ovs-vswitchd", self.remote, f"--pidfile={self.dir}/ovs-vswitchd.pid", *common], check=True, env=self.env)
        return self

    def vsctl(self, *args) -> str:
        out = subprocess.run(["ovs-vsctl", f"--db={self.remote}", "--timeout=10", *args], check=True, capture_output=True, text=True, env=self.env)
        return out.stdout.strip()

    def stop(self):
        # Userspace-datapath ports are persistent tap devices: delete bridges while vswitchd runs.
        try:
            for bridge in self.vsctl("list-br").split():
                self.vsctl("--if-exists", "del-br", bridge)
        except subprocess.CalledProcessError:
            pass
        for name in ("ovs-vswitchd", "ovsdb-server"):
            pidfile = self.dir / f"{name}.pid"
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)
        subprocess.run(["ip", "link", "del", "ovs-netdev"], capture_output=True)


def _running(command: str) -> bool:
    for comm in glob.glob("/proc/[0-9]*/comm"):
        try:
            if Path(comm).read_text().strip() == command:
                return True
        except OSError:
            pass
    return False


def count_frames(ifname: str, mac: str, seconds: float, until: tuple[str, int] | None = None, outgoing: bool = False) -> dict:
    """Frames arriving on ifname for `seconds` (or until counts[until[0]] reaches until[1]),
    split by the guest's point of view: out = sent by mac, in = addressed to mac (unicast).
    outgoing: count the frames ifname sends (a bridge port towards a peer) instead of those it receives."""
    import socket

    counts = {"out": 0, "in": 0, "other": 0, "ipv4_out": 0, "longest": 0}  # longest: of the IPv4 frames mac sent
    raw = bytes(int(x, 16) for x in mac.split(":"))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        sock.bind((ifname, 0))
        sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame, addr = sock.recvfrom(65535)
            except socket.timeout:
                continue
            if (addr[2] == socket.PACKET_OUTGOING) != outgoing:
                continue
            if frame[6:12] == raw:
                counts["out"] += 1
                if frame[12:14] == b"\x08\x00":
                    counts["ipv4_out"] += 1
                    counts["longest"] = max(counts["longest"], len(frame))
            elif frame[0:6] == raw:
                counts["in"] += 1
            else:
                counts["other"] += 1
            if until and counts[until[0]] >= until[1]:
                break
    finally:
        sock.close()
    return counts


# ---------------------------------------------------------------- test topology helpers

_subnets = itertools.count(1)


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


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


class Guests:
    """Defines and starts tiny guests on one host; destroys and undefines them afterwards."""

    def __init__(self, host: LibvirtHost, workdir):
        self.host = host
        self.workdir = workdir
        self.conn = host.connect()
        self.uuids = []

    def start(self, lan: Lan, n: int, nics: int = 1, ovs: bool = False, name: str | None = None, tags=()):
        uuid = str(uuidlib.uuid4())
        name = name or f"vtk-{uuid[:8]}"
        macs = [f"52:54:00:{n:02x}:{int(lan.subnet.split('.')[2]):02x}:{i:02x}" for i in range(nics)]
        xml = domain_xml(name, uuid, macs, lan.bridge, lan.ip(n), lan.ip(1), self.workdir, ovs=ovs, tags=tags)
        dom = self.conn.defineXML(xml)
        self.uuids.append(uuid)
        dom.create()
        return dom, macs

    def define_without_nics(self, lan: Lan):
        uuid = str(uuidlib.uuid4())
        dom = self.conn.defineXML(domain_xml(f"vtk-{uuid[:8]}", uuid, [], lan.bridge, lan.ip(9), lan.ip(1), self.workdir))
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
