"""Selector flows on the lab: every VM that matches is tapped, including VMs that start matching later."""

import json
import os
import threading
import time

import pytest

from vtap_core.client import Client
from vtap_core.errors import Unsupported, ValidationError
from vtap_core.follow import Follower
from vtap_drivers.lab import traffic
from vtap_drivers.lab.demo import frames_from
from vtap_drivers.lab.topology import vm_mac, vm_uuid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and tc filters")



def copies(lab, mon_port, sender, receiver):
    """Frames sent by `sender` that reached the monitor port `mon_port`."""
    sniffer = traffic.Sniffer(lab.ns("mon"), mon_port)
    try:
        traffic.send(lab.ns(f"vm{sender}"), "eth0", frames_from(sender, receiver, "tcp/80", 10))
        return sniffer.settle()[(vm_mac(sender), "tcp/80")]
    finally:
        sniffer.close()


def wait_for(predicate, limit=10.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_selector_taps_the_matching_vms_and_follows_a_vm_that_starts_matching(lab, state_path):
    with Client(driver="lab", state=state_path, prefix=lab.prefix) as client:
        client.create_session("ids", to="port:mon0")
        client.add_flow("ids", select="host=host1", direction="out", name="host1-vms")
        assert copies(lab, "h1", 1, 3) == 10
        assert copies(lab, "h1", 2, 3) == 10
        assert copies(lab, "h2", 3, 1) == 0  # vm3 is on host2: not a member

        (row,) = client.status()
        assert row.state == "active" and row.source == "select host=host1"
        assert sorted(m["name"] for m in row.members) == ["vm1", "vm2"]
        assert all(m["state"] == "active" and m["packets"] >= 10 for m in row.members)
        assert row.packets == sum(m["packets"] for m in row.members)

        stop = threading.Event()
        follower = Follower(Client(driver="lab", state=state_path, prefix=lab.prefix), interval=30)
        thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
        thread.start()
        try:
            time.sleep(0.5)
            lab.move("vm3", "host1")  # vm3 now matches host=host1
            lab.move("vm1", "host2")  # vm1 no longer does
            assert wait_for(lambda: sorted(m["name"] for m in client.status()[0].members) == ["vm2", "vm3"])
            assert wait_for(lambda: client.status()[0].state == "active")
            assert copies(lab, "h1", 3, 2) == 10
            assert copies(lab, "h2", 1, 2) == 0
            assert copies(lab, "h1", 1, 2) == 0
        finally:
            stop.set()
            thread.join(timeout=10)

        changes = [c for row in client.audit() if "selector membership" in row["command"] for c in row["change"]["members"]]
        joined = {c["joined"].split("#")[0] for c in changes if "joined" in c}
        left = {c["left"].split("#")[0] for c in changes if "left" in c}
        assert joined >= {vm_uuid(lab.prefix, "vm1"), vm_uuid(lab.prefix, "vm2"), vm_uuid(lab.prefix, "vm3")}
        assert left == {vm_uuid(lab.prefix, "vm1")}
        assert all("host=host1" in c["why"] for c in changes if "joined" in c)


def test_flow_show_says_why_each_member_matched(lab, state_path):
    with Client(driver="lab", state=state_path, prefix=lab.prefix) as client:
        client.create_session("ids", to="port:mon0")
        client.add_flow("ids", select="name=vm[12]", name="two")
        members = client.flow_members("two")
        assert [(m.vm_name, m.why) for m in members] == [("vm1", "name=vm[12]: name vm1"), ("vm2", "name=vm[12]: name vm2")]


def snapshot(client, lab):
    import subprocess

    tc = "".join(subprocess.run(["ip", "netns", "exec", lab.ns(h), "tc", "filter", "show", "dev", f"tap-vm{i}", d], capture_output=True, text=True).stdout
                 for h in ("host1", "host2") for i in (1, 2, 3) for d in ("ingress", "egress"))
    return [f.to_dict() for f in client.flows()], len(client.audit()), tc


def test_bad_selectors_and_the_cap_change_nothing(lab, state_path, monkeypatch):
    with Client(driver="lab", state=state_path, prefix=lab.prefix) as client:
        client.create_session("ids", to="port:mon0")
        before = snapshot(client, lab)
        with pytest.raises(ValidationError, match="unknown key 'colour'"):
            client.add_flow("ids", select="colour=red")
        with pytest.raises(Unsupported, match="driver lab cannot do selector key 'tag'"):
            client.add_flow("ids", select="tag=pci")
        monkeypatch.setenv("VTAP_SELECTOR_CAP", "2")
        with pytest.raises(ValidationError, match="matches 3 NICs, more than the cap of 2"):
            client.add_flow("ids", select="name=vm*")
        assert snapshot(client, lab) == before


def test_cli_select_exit_codes_and_json(lab, state_path, tmp_path):
    import subprocess
    import sys

    def vtap(*args):
        return subprocess.run([sys.executable, "-m", "vtap_cli.main", "--driver", "lab", "--state", state_path, *args],
                              capture_output=True, text=True, env={**os.environ, "VTAP_LAB_PREFIX": lab.prefix})

    assert vtap("session", "create", "ids", "--to", "port:mon0").returncode == 0, "lab prefix setting"
    bad = vtap("flow", "add", "ids", "--select", "name=[vm")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "never closed" in bad.stderr
    assert vtap("flow", "add", "ids", "--select", "name=vm3", "--name", "three").returncode == 0
    rows = json.loads(vtap("status", "-o", "json").stdout)
    assert rows[0]["members"][0]["name"] == "vm3" and rows[0]["state"] == "active"
    document = tmp_path / "taps.yaml"
    document.write_text("sessions:\n  - name: ids\n    to: port:mon0\n    flows:\n      - name: webs\n        select: name=vm*\n        direction: in\n")
    assert vtap("apply", "-f", str(document)).returncode == 0
    rows = json.loads(vtap("status", "-o", "json").stdout)
    assert [r["flow"] for r in rows] == ["webs"] and len(rows[0]["members"]) == 3
