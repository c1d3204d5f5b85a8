"""A lab of network namespaces that plays hypervisor hosts and VMs.

    <prefix>-host1, <prefix>-host2   each a "hypervisor": bridge br0, a `wire` port
                                     joining the two bridges, and `mon0`, a port
                                     leading to the monitoring namespace
    <prefix>-mon                     the monitoring tool: h1 (from host1's mon0), h2
    <prefix>-vmN                     a "VM": eth0 (52:54:00:77:00:0N, 10.77.0.N/24),
                                     its host end `tap-vmN` on the bridge of the host
                                     the VM runs on; that device carries the mark
                                     "vtaplab-vm <uuid> <name>" as its alias

Moving a VM deletes its host-side device and creates a new one on the other
host, as a live migration does. Everything is made through netlink (pyroute2).
"""

from __future__ import annotations

import contextlib
import uuid as uuidlib

from pyroute2 import IPRoute, netns

VM_MARK = "vtaplab-vm"
UUID_SPACE = uuidlib.UUID("6f1c1b2e-0c4e-4c1e-9a55-7a2d3c0f7a10")
HOSTS = ("host1", "host2")


def vm_uuid(prefix: str, name: str) -> str:
    return str(uuidlib.uuid5(UUID_SPACE, f"{prefix}/{name}"))


def vm_mac(index: int) -> str:
    return f"52:54:00:77:00:{index:02x}"


def vm_ip(index: int) -> str:
    return f"10.77.0.{index}"


class Lab:
    def __init__(self, prefix: str = "vtapdemo"):
        self.prefix = prefix

    def ns(self, part: str) -> str:
        return f"{self.prefix}-{part}"

    @property
    def host_namespaces(self) -> dict[str, str]:
        return {host: self.ns(host) for host in HOSTS}

    def exists(self) -> bool:
        return self.ns("host1") in netns.listnetns()

    # building -------------------------------------------------------------

    def build(self, vms: dict[str, str]) -> None:
        """Create the lab; `vms` maps VM name -> host it starts on."""
        self.destroy()
        for part in (*HOSTS, "mon"):
            netns.create(self.ns(part))
            quiet_ipv6(self.ns(part))
        for number, host in enumerate(HOSTS, start=1):
            with IPRoute(netns=self.ns(host)) as ipr:
                ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0)
                up(ipr, "lo")
                up(ipr, "br0")
                ipr.link("add", ifname="mon0", kind="veth", peer={"ifname": f"h{number}", "net_ns_fd": self.ns("mon")})
                up(ipr, "mon0")
        with IPRoute(netns=self.ns("host1")) as ipr:
            ipr.link("add", ifname="wire", kind="veth", peer={"ifname": "wire", "net_ns_fd": self.ns("host2")})
            attach(ipr, "wire", "br0")
        with IPRoute(netns=self.ns("host2")) as ipr:
            attach(ipr, "wire", "br0")
        with IPRoute(netns=self.ns("mon")) as ipr:
            for name in ("lo", "h1", "h2"):
                up(ipr, name)
        for index, (name, host) in enumerate(vms.items(), start=1):
            netns.create(self.ns(name))
            quiet_ipv6(self.ns(name))
            self._plug(name, index, host)
            with IPRoute(netns=self.ns(name)) as ipr:
                up(ipr, "lo")
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth0, address=vm_ip(index), prefixlen=24)

    def destroy(self) -> None:
        for name in netns.listnetns():
            if name.startswith(f"{self.prefix}-"):
                netns.remove(name)

    # VMs ------------------------------------------------------------------

    def vms(self) -> list[dict]:
        """Every VM found by the marks on host-side devices: name, uuid, host, device, mac."""
        found = []
        for host, namespace in self.host_namespaces.items():
            with contextlib.suppress(FileNotFoundError), IPRoute(netns=namespace) as ipr:
                for link in ipr.get_links():
                    alias = link.get("ifalias") or ""
                    if alias.startswith(VM_MARK + " "):
                        _, uuid, name, mac = alias.split()
                        found.append({"name": name, "uuid": uuid, "host": host, "device": link.get("ifname"), "mac": mac})
        return found

    def move(self, name: str, to_host: str) -> None:
        """Migrate: the VM's device goes away on its host and appears on the other one."""
        current = [vm for vm in self.vms() if vm["name"] == name]
        index = int(current[0]["mac"].rsplit(":", 1)[1], 16) if current else None
        for vm in current:
            with IPRoute(netns=self.ns(vm["host"])) as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname=vm["device"])[0])
        self._plug(name, index, to_host)
        with IPRoute(netns=self.ns(name)) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=vm_ip(index), prefixlen=24)

    def _plug(self, name: str, index: int, host: str) -> None:
        device = f"tap-{name}"[:15]
        with IPRoute(netns=self.ns(host)) as ipr:
            ipr.link("add", ifname=device, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.ns(name)})
            ipr.link("set", index=ipr.link_lookup(ifname=device)[0], ifalias=f"{VM_MARK} {vm_uuid(self.prefix, name)} {name} {vm_mac(index)}")
            attach(ipr, device, "br0")
        with IPRoute(netns=self.ns(name)) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=eth0, address=vm_mac(index), state="up")


def up(ipr, ifname: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")


def attach(ipr, ifname: str, bridge: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], master=ipr.link_lookup(ifname=bridge)[0], state="up")


def quiet_ipv6(namespace: str) -> None:
    """No IPv6 autoconfiguration chatter: the lab's packet counts stay exact."""
    netns.pushns(namespace)
    try:
        for scope in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as handle:
                handle.write("1")
    finally:
        netns.popns()
