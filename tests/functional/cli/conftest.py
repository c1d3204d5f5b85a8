"""A netns with a source and a monitor port, and helpers to run `vtap` inside it and read the kernel."""

import json
import os
import subprocess
import sys

import pytest

from vtap_core.store import Store


class Host:
    """One network namespace acting as a host, with the vtap CLI run inside it."""

    def __init__(self, name, state, datapath="tc"):
        self.name = name
        self.state = state
        self.datapath = datapath

    def command(self, *args):
        """argv of one vtap run on this host; tcx's runs outside `ip netns exec`, whose /sys has no
        bpffs to keep pins in (VTAP_LINUX_NETNS names the namespace instead)."""
        vtap = [sys.executable, "-m", "vtap_cli.main", "--state", self.state, *args]
        return vtap if self.datapath == "tcx" else ["ip", "netns", "exec", self.name, *vtap]

    def pins(self):
        """The tcx mirrors in the kernel, by pin name (mark and target)."""
        from vtap_drivers.linux import tcxmirror

        directory = tcxmirror.pin_dir(self.name)
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []

    def sh(self, *args, check=True):
        return subprocess.run(["ip", "netns", "exec", self.name, *args], capture_output=True, text=True, check=check)

    def vtap(self, *args, **kwargs):
        return subprocess.run(self.command(*args), capture_output=True, text=True, **kwargs)

    def vtap_ok(self, *args):
        result = self.vtap(*args)
        assert result.returncode == 0, f"vtap {' '.join(args)}: {result.stderr}"
        return result.stdout

    def links(self):
        return {link["ifname"]: link for link in json.loads(self.sh("ip", "-j", "-d", "link", "show").stdout)}

    def filters(self, dev, hook):
        result = self.sh("tc", "-j", "filter", "show", "dev", dev, hook, check=False)
        return json.loads(result.stdout or "[]") if result.returncode == 0 else []

    def kernel(self):
        """Everything vtap could have touched: links with kinds and aliases, qdiscs, filters."""
        links = self.links()
        state = {"links": sorted((n, l.get("linkinfo", {}).get("info_kind"), l.get("ifalias")) for n, l in links.items())}
        state["qdiscs"] = json.loads(self.sh("tc", "-j", "qdisc", "show").stdout)
        for name in links:
            for hook in ("ingress", "egress"):
                state[f"{name}/{hook}"] = self.filters(name, hook)
        state["pins"] = self.pins()
        return state

    def store(self):
        store = Store(self.state, driver="linux")
        try:
            return [s.to_dict() for s in store.sessions()], [f.to_dict() for f in store.flows()]
        finally:
            store.close()


@pytest.fixture
def host(netns, tmp_path, datapath, monkeypatch):
    """eth0 (peer: wire0) as the source, mon0 (peer: monpeer) as the monitor port."""
    monkeypatch.setenv("VTAP_DATAPATH", datapath)  # every vtap the test runs, Popen ones too
    if datapath == "tcx":
        monkeypatch.setenv("VTAP_LINUX_NETNS", netns)
    h = Host(netns, str(tmp_path / "vtap.db"), datapath)
    for a, b in (("eth0", "wire0"), ("mon0", "monpeer")):
        h.sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        h.sh("ip", "link", "set", a, "up")
        h.sh("ip", "link", "set", b, "up")
    h.sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    try:
        yield h
    finally:
        if datapath == "tcx":
            from datapaths import remove_pins

            remove_pins(netns)
