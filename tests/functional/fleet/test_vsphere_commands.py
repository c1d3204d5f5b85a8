"""`vtap session/flow ...` against one vCenter with an etcd store, beside (or without) an elected follower.

A command run from an admin machine must never be a second applier: while a follower leads, it
only writes the store and reports what the leader made of it; while no one leads, it is elected for
the command, applies fenced and resigns. Real etcd, the real simulator (its request log names the
process behind every vspan change), the CLI as a separate process.
"""

import threading

from fleetlib import wait_for
from test_vsphere_election import PREFIX, fleet, leader_of, sim  # noqa: F401 (fixtures)

from vtap_core.client import Client
from vtap_core.leader import AUDIT_COMMAND


def senders(fleet):
    return {host for _, host, _, _ in fleet.requests()}


def test_with_a_leader_running_a_cli_change_is_applied_by_the_leader_alone(fleet):
    vc = fleet.vc
    follower = fleet.start("f1")
    assert leader_of(fleet) == "f1"
    monitor, source = vc.vm(5).config.instanceUuid, vc.vm(0).config.instanceUuid

    created = fleet.vtap("session", "create", "web", "--to", f"vm:{monitor}")
    assert (created.returncode, created.stdout) == (0, "session web created; the elected follower on f1 applies it\n"), created.stderr
    added = fleet.vtap("flow", "add", "web", "--vm", source, "--name", "web-1")
    assert (added.returncode, added.stdout) == (0, "flow web-1 added to session web; applied by the elected follower on f1: web-1 active\n"), added.stderr
    assert fleet.mirrored_ports() == {vc.port_key(vc.vm(0))}  # read back from the simulator
    # Every vspan change came from the leader's process; the CLI made none.
    assert [(host, pid) for _, host, pid, _ in fleet.requests()] == [("f1", follower.pid)]
    rows = [r for r in fleet.store().audit() if r["command"] == AUDIT_COMMAND]
    assert rows and {r["change"]["leader"] for r in rows} == {"f1"}
    assert [r["host"] for r in fleet.store().leaders()] == ["f1"]

    status = fleet.vtap("-o", "json", "status")
    assert status.returncode == 0, status.stderr
    assert '"host": "f1"' in status.stdout and "stale" not in status.stdout  # the leader's report, live

    deleted = fleet.vtap("flow", "delete", "web-1")
    assert (deleted.returncode, deleted.stdout) == (0, "flow web-1 deleted; removed by the elected follower on f1\n"), deleted.stderr
    assert fleet.mirrored_ports() == set()
    assert senders(fleet) == {"f1"}


def test_a_change_the_leader_has_not_reported_is_stored_and_left_to_it(fleet):
    """A leader that does not answer in time (here: one that never reports): the command says so and exits 0."""
    vc = fleet.vc
    store = fleet.store()
    rival = store.election(fleet.sim.url, "busy", 60)
    assert rival.campaign(threading.Event())
    try:
        created = fleet.vtap("session", "create", "web", "--to", f"vm:{vc.vm(5).config.instanceUuid}")
        assert created.returncode == 0, created.stderr
        added = fleet.vtap("--wait", "1", "flow", "add", "web", "--vm", vc.vm(0).config.instanceUuid, "--name", "web-1")
        assert (added.returncode, added.stdout) == (
            0, "flow web-1 added to session web; stored: the elected follower on busy will apply it (no report of it within 1 s; `vtap status` shows its report)\n"), added.stderr
        assert [f.name for f in fleet.store().flows()] == ["web-1"]
        assert fleet.mirrored_ports() == set() and fleet.requests() == []  # vCenter untouched
        # The SDK's reconcile leaves it to the leader too: nothing done here.
        with Client(driver="vsphere", state=str(fleet.tmp / "sdk" / "state.db"), store=fleet.url, host="sdk",
                    url=fleet.sim.url, user=fleet.sim.user, password=fleet.sim.password) as sdk:
            assert sdk.reconcile().empty
        assert fleet.mirrored_ports() == set() and fleet.requests() == []
        before = fleet.etcd.keys(PREFIX)
        bad = fleet.vtap("--wait", "-1", "flow", "delete", "web-1")
        assert (bad.returncode, bad.stderr) == (2, "vtap: wait: -1 must be 0 to 3600 seconds\n")
        unknown = fleet.vtap("flow", "add", "web", "--vm", "no-such-vm")
        assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1, unknown.stderr
        assert fleet.etcd.keys(PREFIX) == before and fleet.requests() == []  # store and vCenter unchanged
    finally:
        rival.resign()


def test_with_no_leader_the_cli_applies_fenced_and_resigns(fleet):
    vc = fleet.vc
    created = fleet.vtap("session", "create", "web", "--to", f"vm:{vc.vm(5).config.instanceUuid}")
    assert created.returncode == 0, created.stderr
    added = fleet.vtap("flow", "add", "web", "--vm", vc.vm(0).config.instanceUuid, "--name", "web-1")
    assert (added.returncode, added.stdout) == (0, "flow web-1 added to session web (1 platform objects added, 0 removed)\n"), added.stderr
    assert fleet.mirrored_ports() == {vc.port_key(vc.vm(0))}
    assert senders(fleet) == {"admin"}
    fenced = [r for r in fleet.store().audit() if r["command"] == AUDIT_COMMAND]
    assert [r["change"]["leader"] for r in fenced] == ["admin"], fenced  # the apply's fence row, under the CLI's term
    assert fleet.store().leaders() == [] and fleet.etcd.keys(f"{PREFIX}/leaders") == {}  # leadership given up

    # A follower started now leads, and the next command leaves the work to it.
    fleet.start("f1")
    assert leader_of(fleet) == "f1"
    (fleet.tmp / "taps.yaml").write_text(f"sessions:\n  - name: web\n    to: vm:{vc.vm(5).config.instanceUuid}\n    flows: []\n")
    applied = fleet.vtap("apply", "-f", str(fleet.tmp / "taps.yaml"))
    assert (applied.returncode, applied.stdout) == (0, f"applied {fleet.tmp / 'taps.yaml'}; removed by the elected follower on f1\n"), applied.stderr
    assert wait_for(lambda: fleet.mirrored_ports() == set())
    assert [host for _, host, _, _ in fleet.requests()][-1] == "f1"
    assert [host for _, host, _, _ in fleet.requests()].count("admin") == 1


def test_a_cli_change_right_after_kill_9_of_the_leader_has_one_applier_at_a_time(fleet):
    """The CLI races the standby for the dead leader's place: whoever wins applies, never both at once."""
    vc = fleet.vc
    fleet.start("f1")
    assert leader_of(fleet) == "f1"
    fleet.start("f2")
    assert wait_for(lambda: "standing by" in fleet.log("f2")), fleet.log("f2")
    created = fleet.vtap("session", "create", "web", "--to", f"vm:{vc.vm(5).config.instanceUuid}")
    assert created.returncode == 0, created.stderr

    fleet.followers["f1"].kill()  # kill -9
    fleet.followers["f1"].wait()
    added = fleet.vtap("flow", "add", "web", "--vm", vc.vm(0).config.instanceUuid, "--name", "web-1")
    assert added.returncode == 0, added.stderr
    assert wait_for(lambda: fleet.mirrored_ports() == {vc.port_key(vc.vm(0))}, 15), added.stdout
    assert wait_for(lambda: [r["host"] for r in fleet.store().leaders()] == ["f2"], 15)

    # Each fenced apply names one applier per term, terms only grow, and the simulator saw the
    # vspan changes of one process after another, never interleaved.
    fenced = [r["change"] for r in fleet.store().audit() if r["command"] == AUDIT_COMMAND]
    assert fenced and [c["term"] for c in fenced] == sorted(c["term"] for c in fenced)
    assert all(len({c["leader"] for c in fenced if c["term"] == term}) == 1 for term in {c["term"] for c in fenced})
    sent = [(host, pid) for _, host, pid, _ in fleet.requests()]
    blocks = [s for i, s in enumerate(sent) if i == 0 or sent[i - 1] != s]
    assert len(blocks) == len(set(blocks)) and {h for h, _ in blocks} <= {"admin", "f2"}, (sent, added.stdout)
    print(f"after kill -9: {added.stdout.strip()}; vspan changes by {blocks}")


def test_when_the_only_leader_dies_the_waiting_cli_applies_once_its_lease_ends(fleet):
    vc = fleet.vc
    follower = fleet.start("f1")
    assert leader_of(fleet) == "f1"
    created = fleet.vtap("session", "create", "web", "--to", f"vm:{vc.vm(5).config.instanceUuid}")
    assert created.returncode == 0, created.stderr
    follower.kill()  # kill -9: its key stays until etcd ends its lease (5 s)
    follower.wait()
    added = fleet.vtap("--wait", "20", "flow", "add", "web", "--vm", vc.vm(0).config.instanceUuid, "--name", "web-1")
    assert (added.returncode, added.stdout) == (
        0, f"flow web-1 added to session web; no follower leads {fleet.sim.url} now: applied here (1 platform objects added, 0 removed)\n"), added.stderr
    assert fleet.mirrored_ports() == {vc.port_key(vc.vm(0))}
    assert senders(fleet) == {"admin"}
    assert [r["change"]["leader"] for r in fleet.store().audit() if r["command"] == AUDIT_COMMAND] == ["admin"]
    assert fleet.store().leaders() == []
