"""Several `vtap follow` processes on one vCenter with an etcd store: one leads and applies, the others stand by.

Real etcd, the real simulator (started with --request-log: one line per vspan change, with the
caller's User-Agent, which names the vtap host and process), real processes killed and frozen.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleetlib import desire, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vsphere"))
from vcsim_simulator import Simulator, available  # noqa: E402

pytest.importorskip("pyVmomi", reason="pyvmomi missing: run scripts/setup --test")
from vcenter import Vcenter  # noqa: E402

from vtap_core.leader import AUDIT_COMMAND, NotLeader  # noqa: E402
from vtap_core.stores import open_store  # noqa: E402

PREFIX = "vtap/vc"


@pytest.fixture
def sim(tmp_path):
    why = available()
    if why:
        pytest.skip(why)
    with Simulator(hosts=3, vms=6, request_log=tmp_path / "requests.jsonl") as simulator:
        simulator.request_log = tmp_path / "requests.jsonl"
        yield simulator


class Fleet:
    """Follower processes of one vCenter, an admin's CLI, and a direct view of store and simulator."""

    def __init__(self, etcd, sim, tmp_path):
        self.etcd, self.sim, self.tmp = etcd, sim, tmp_path
        self.url = etcd.url(PREFIX)
        self.vc = Vcenter(sim.connect())
        self.followers = {}  # host -> Popen

    def env(self, host):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
        env.update({"VTAP_STORE": self.url, "VTAP_HOST": host, "VTAP_VSPHERE_URL": self.sim.url,
                    "VTAP_VSPHERE_USER": self.sim.user, "VTAP_VSPHERE_PASSWORD": self.sim.password})
        return env

    def vtap(self, *args, host="admin"):
        command = [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--state", str(self.tmp / host / "state.db"), *args]
        return subprocess.run(command, capture_output=True, text=True, env=self.env(host), timeout=60)

    def start(self, host):
        log = open(self.tmp / f"{host}.log", "ab")
        command = [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--state", str(self.tmp / host / "state.db"),
                   "follow", "--interval", "120", "--leader-ttl", "5"]
        self.followers[host] = subprocess.Popen(command, env=self.env(host), stdout=subprocess.DEVNULL, stderr=log)
        return self.followers[host]

    def log(self, host):
        return (self.tmp / f"{host}.log").read_text()

    def stop_all(self):
        for process in self.followers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()

    def store(self):
        return open_store(self.url, "vsphere", str(self.tmp / "test" / "state.db"))

    def leaders(self):
        """The leaders as `vtap hosts` shows them: [(host, LEADS column)]."""
        rows = json.loads(self.vtap("-o", "json", "hosts").stdout or "[]")
        return [(row["host"], row["leads"]) for row in rows if row.get("leads")]

    def desire(self, session=None, flow=None):
        """A change of the desired state only (as another machine's admin tool writes it): the leader must realize it."""
        desire(self.store(), session, flow)

    def tap_web(self):
        """Session web: VM0 mirrored to the monitoring VM5, in the store only."""
        self.desire(session={"name": "web", "to": f"vm:{self.vc.vm(5).config.instanceUuid}"})
        self.desire(flow={"name": "web-1", "session": "web", "vm": self.vc.vm(0).config.instanceUuid, "direction": "both"})

    def mirrored_ports(self, session="web"):
        found = self.vc.sessions().get(f"vtap:{session}")
        if found is None:
            return set()
        return {key for ports in (found.sourcePortTransmitted, found.sourcePortReceived) if ports for key in ports.portKey or ()}

    def requests(self):
        """The simulator's vspan changes: [(time, host, pid, what)] in order."""
        rows = []
        for line in self.sim.request_log.read_text().splitlines():
            row = json.loads(line)
            agent = row["userAgent"]  # vtap/VERSION (HOST; pid PID); the test's own pyVmomi session has another
            if not agent.startswith("vtap/"):
                continue
            host, pid = agent[agent.index("(") + 1:-1].split("; pid ")
            rows.append((row["time"], host, int(pid), row["vspanSessions"]))
        return rows


@pytest.fixture
def fleet(etcd, sim, tmp_path):
    fleet = Fleet(etcd, sim, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def leader_of(fleet):
    found = wait_for(lambda: fleet.leaders(), 20)
    assert len(found) == 1, found
    host, leads = found[0]
    assert leads.startswith(fleet.sim.url)
    return host


def test_three_followers_one_leader_a_standby_takes_over_after_kill_9(fleet):
    vc = fleet.vc
    for host in ("f1", "f2", "f3"):
        fleet.start(host)
    first = leader_of(fleet)
    assert wait_for(lambda: sum("standing by" in fleet.log(h) for h in ("f1", "f2", "f3")) == 2), [fleet.log(h) for h in ("f1", "f2", "f3")]
    assert sum("leading " in fleet.log(h) for h in ("f1", "f2", "f3")) == 1

    fleet.tap_web()
    assert wait_for(lambda: fleet.mirrored_ports() == {vc.port_key(vc.vm(0))})

    fleet.followers[first].kill()  # kill -9
    killed = fleet.followers[first].wait()
    assert killed == -signal.SIGKILL
    t0 = time.monotonic()
    fleet.desire(flow={"name": "web-late", "session": "web", "vm": vc.vm(1).config.instanceUuid, "direction": "out"})
    want = {vc.port_key(vc.vm(0)), vc.port_key(vc.vm(1))}
    assert wait_for(lambda: fleet.mirrored_ports() == want, 10), "a standby did not realize the change within 10 s of the kill"
    takeover = time.monotonic() - t0
    second = leader_of(fleet)
    assert second != first and second in ("f2", "f3", "f1")
    print(f"takeover: change realized {takeover:.2f} s after kill -9 of the leader")

    # Never two appliers: the simulator saw each follower's vspan changes in one block, the first
    # leader's (until it died) then the second's, and each from the process that led then.
    senders = [(host, pid) for _, host, pid, _ in fleet.requests()]
    blocks = [s for i, s in enumerate(senders) if i == 0 or senders[i - 1] != s]
    assert blocks == [(first, fleet.followers[first].pid), (second, fleet.followers[second].pid)], senders
    # The audit log agrees: every leader apply carries its term, terms only grow, one host per term.
    rows = [r for r in fleet.store().audit() if r["command"] == AUDIT_COMMAND]
    terms = [r["change"]["term"] for r in rows]
    assert terms == sorted(terms) and len(set(terms)) == 2, rows
    assert {(r["change"]["term"], r["change"]["leader"]) for r in rows} == {(terms[0], first), (terms[-1], second)}


def test_a_leader_frozen_past_its_lease_applies_nothing_until_elected_again(fleet):
    vc = fleet.vc
    follower = fleet.start("f1")
    assert leader_of(fleet) == "f1"
    fleet.tap_web()
    assert wait_for(lambda: fleet.mirrored_ports() == {vc.port_key(vc.vm(0))})
    store = fleet.store()
    platform = store.leaders()[0]["platform"]

    follower.send_signal(signal.SIGSTOP)  # a leader paused (a VM stun, a GC pause) past its TTL
    assert wait_for(lambda: not store.leaders(), 10), "etcd did not end the frozen leader's lease"
    rival = store.election(platform, "rival", 60)  # another follower, elected while f1 is frozen
    assert rival.campaign(threading.Event())
    fleet.desire(flow={"name": "web-late", "session": "web", "vm": vc.vm(1).config.instanceUuid, "direction": "out"})  # work f1 wants to do when it wakes
    resumed = len(fleet.requests())
    follower.send_signal(signal.SIGCONT)
    assert wait_for(lambda: "standing by: rival" in fleet.log("f1"), 10), fleet.log("f1")
    time.sleep(2)
    assert fleet.mirrored_ports() == {vc.port_key(vc.vm(0))}, "the deposed leader applied"
    assert fleet.requests()[resumed:] == []
    assert [r for r in store.audit() if r["command"] == AUDIT_COMMAND and r["change"]["leader"] == "f1" and r["id"] > rival.term] == []

    rival.resign()  # f1 may lead again, under a new term, and then does the work
    assert wait_for(lambda: fleet.mirrored_ports() == {vc.port_key(vc.vm(0)), vc.port_key(vc.vm(1))}, 10)
    assert [(host, pid) for _, host, pid, _ in fleet.requests()[resumed:]] == [("f1", follower.pid)]


def test_follow_once_reconciles_only_while_no_one_leads_and_sigterm_hands_over_at_once(fleet):
    vc = fleet.vc
    follower = fleet.start("f1")
    assert leader_of(fleet) == "f1"
    fleet.tap_web()
    assert wait_for(lambda: fleet.mirrored_ports() == {vc.port_key(vc.vm(0))})
    vc.reconfigure_vspan("remove", vc.sessions()["vtap:web"])  # drift; f1 repairs it, --once must not
    once = fleet.vtap("follow", "--once")
    assert (once.returncode, once.stdout) == (0, f"another follower leads {fleet.sim.url}: nothing done\n"), once.stderr
    assert wait_for(lambda: fleet.mirrored_ports() == {vc.port_key(vc.vm(0))})
    assert {host for _, host, _, _ in fleet.requests()} == {"f1"}

    follower.send_signal(signal.SIGTERM)
    assert follower.wait(timeout=15) == 0
    assert fleet.store().leaders() == []  # revoked on the way out, not left to its TTL
    vc.reconfigure_vspan("remove", vc.sessions()["vtap:web"])
    once = fleet.vtap("follow", "--once")
    assert (once.returncode, once.stdout) == (0, "resync: 1 applied, 0 removed, 0 kept\n"), once.stderr
    assert fleet.mirrored_ports() == {vc.port_key(vc.vm(0))}
    assert fleet.requests()[-1][1:] == ("admin", fleet.requests()[-1][2], ["add vtap:web"])
    assert fleet.store().leaders() == []


def test_a_deposed_leader_s_fence_write_fails_even_before_its_clock_says_so(etcd, tmp_path):
    """The txn compare on the leader key: a leader whose key another took is refused at once."""
    store = open_store(etcd.url(PREFIX), "vsphere", str(tmp_path / "state.db"))
    old = store.election("https://vc.example/sdk", "old", 60)
    assert old.campaign(threading.Event())
    old.fence(AUDIT_COMMAND, {"apply": ["k1"]})
    store._post("/lease/revoke", {"ID": old.lease})  # etcd ended its lease (old never heard)
    new = store.election("https://vc.example/sdk", "new", 60)
    assert new.campaign(threading.Event())
    assert old.valid()  # by its own clock it still leads...
    with pytest.raises(NotLeader):
        old.fence(AUDIT_COMMAND, {"apply": ["k2"]})  # ...but its write is refused
    new.fence(AUDIT_COMMAND, {"apply": ["k2"]})
    rows = [(r["change"]["leader"], r["change"]["apply"]) for r in store.audit() if r["command"] == AUDIT_COMMAND]
    assert rows == [("old", ["k1"]), ("new", ["k2"])]


def test_a_leader_cut_from_etcd_stops_applying_when_its_lease_may_have_ended(etcd, tmp_path):
    store = open_store(etcd.url(PREFIX), "vsphere", str(tmp_path / "state.db"))
    election = store.election("https://vc.example/sdk", "h1", 3)
    assert election.campaign(threading.Event())
    assert election.keep_alive()
    etcd.kill()  # etcd stopped for real
    time.sleep(3)
    assert not election.keep_alive()
    with pytest.raises(NotLeader):
        election.fence(AUDIT_COMMAND, {"apply": ["k1"]})


def test_follow_refuses_a_bad_leader_ttl(fleet):
    before = fleet.etcd.keys(PREFIX)
    result = fleet.vtap("follow", "--leader-ttl", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["vtap: leader-ttl: 0 must be 2 to 3600 seconds"]
    assert fleet.etcd.keys(PREFIX) == before and fleet.vc.sessions() == {}
