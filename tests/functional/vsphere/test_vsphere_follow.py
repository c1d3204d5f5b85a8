"""`vtap follow` on vSphere: taps stay right while VMs move, NICs reconnect and sessions drift."""

import threading
import time

import pytest
from pyVmomi import vim

from vcsim_simulator import module_simulator
from vtap_core.client import Client
from vtap_core.follow import Follower, NoMetrics

VSPAN = vim.dvs.VmwareDistributedVirtualSwitch


@pytest.fixture(scope="module")
def vcsim():
    yield from module_simulator(hosts=3, vms=6)


class Reactions(NoMetrics):
    """Counts the follower's per-VM reconciles (what the metrics exporter would see)."""

    def __init__(self, state):
        self.state = state  # the follower's store: a test may add sessions of its own
        self.latencies = []
        self.resyncs = 0

    def observe_latency(self, seconds):
        self.latencies.append(seconds)

    def set_flows(self, desired, observed):
        self.resyncs += 1  # a hint to look at everything (a VM changed host) ends here too

    @property
    def reactions(self):
        return len(self.latencies) + self.resyncs


def connect(vcsim, state):
    return Client(driver="vsphere", state=state, url=vcsim.url, user=vcsim.user, password=vcsim.password)


@pytest.fixture
def tapped(vcsim, vc, tmp_path):
    """Session web: VM0 and VM1 mirrored to the monitoring VM5, with `follow` running."""
    state = str(tmp_path / "vtap.db")
    with connect(vcsim, state) as client:
        client.create_session("web", to=f"vm:{vc.vm(5).config.instanceUuid}")
        client.add_flow("web", vm=vc.vm(0).config.instanceUuid, direction="both")
        client.add_flow("web", vm=vc.vm(1).name, direction="out")
    reactions, stop, started = Reactions(state), threading.Event(), threading.Event()

    def follow():
        with connect(vcsim, state) as client:
            follower = Follower(client, interval=300, metrics=reactions)
            threading.Thread(target=lambda: (wait_for(lambda: follower.resyncs >= 1), started.set()), daemon=True).start()
            follower.run(stop)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert started.wait(30), "the follower did not finish its first resync"
    # The watch is live once a change to some VM brings a reaction: touch an untapped VM until one does.
    bystander = vc.vm(4)
    for attempt in range(20):
        vc.wait(bystander.ReconfigVM_Task(vim.vm.ConfigSpec(annotation=f"watch check {attempt}")))
        if wait_for(lambda: reactions.latencies, timeout=1.0):
            break
    assert reactions.latencies, "the follower's watch never reported a change"
    yield reactions
    stop.set()
    thread.join(timeout=15)
    with connect(vcsim, state) as client:
        client.delete_session("web")
    assert "vtap:web" not in vc.sessions()


def status_rows(vcsim, tapped):
    with connect(vcsim, tapped.state) as client:
        return client.status()


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def received(vc):
    """The mirrored ports; none while the core replaces the session (remove, then add)."""
    session = vc.sessions().get("vtap:web")
    return sorted(session.sourcePortReceived.portKey) if session else []


def reverted(vc):
    session = vc.sessions().get("vtap:web")
    return session is not None and not session.mirroredPacketLength


def relocate(vc, vm, host):
    vc.wait(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=host)))
    assert vm.runtime.host == host


def test_relocated_vm_of_an_encapsulated_session_is_verified_not_rebuilt(vc, si, vcsim, tapped):
    vm = vc.vm(2)
    with connect(vcsim, tapped.state) as client:
        client.create_session("far", to="gre://192.0.2.30")
        client.add_flow("far", vm=vm.config.instanceUuid, direction="both")
    session, version = vc.sessions()["vtap:far"], vc.version()
    source_host = vm.runtime.host
    destination = next(h for h in vc.hosts() if h != source_host)
    reactions_before = tapped.reactions

    relocate(vc, vm, destination)

    assert wait_for(lambda: tapped.reactions > reactions_before), "the follower did not react to the migration"
    events = si.content.eventManager.QueryEvents(vim.event.EventFilterSpec(eventTypeId=["VmMigratedEvent"]))
    assert any(e.vm.vm == vm and e.sourceHost.host == source_host for e in events)
    # Same switch, same port, and GRE copies leave from any host: verified and left as it was.
    assert vc.version() == version
    assert vc.sessions()["vtap:far"].key == session.key
    relocate(vc, vm, source_host)
    with connect(vcsim, tapped.state) as client:
        client.delete_session("far")


def test_source_vm_moved_away_from_its_monitoring_vm_leaves_the_session_and_is_a_problem(vc, vcsim, tapped):
    vm, other = vc.vm(0), vc.vm(1)
    home, away = vm.runtime.host, vc.hosts()[1]
    assert home == vc.vm(5).runtime.host != away
    both = sorted([vc.port_key(vm), vc.port_key(other)])
    assert received(vc) == both

    relocate(vc, vm, away)
    # The dvPortMirror session cannot deliver VM0's copies from another host: its port leaves the session.
    assert wait_for(lambda: received(vc) == [vc.port_key(other)]), f"session still mirrors {received(vc)}"
    assert not vc.sessions()["vtap:web"].sourcePortTransmitted.portKey
    status = {row.flow: row for row in status_rows(vcsim, tapped)}
    assert status["web-1"].state != "active" and "one ESXi host" in status["web-1"].problem
    assert status["web-2"].state == "active"

    relocate(vc, vm, home)
    assert wait_for(lambda: received(vc) == both), "the flow did not come back with its VM"
    assert {row.state for row in status_rows(vcsim, tapped)} == {"active"}


def test_monitoring_vm_moved_away_stops_every_flow_and_comes_back(vc, vcsim, tapped):
    target = vc.vm(5)
    home, away = target.runtime.host, vc.hosts()[2]
    both = received(vc)

    relocate(vc, target, away)
    # The hint is about the monitoring VM, not about the flows' VMs: the follower looks at everything.
    assert wait_for(lambda: "vtap:web" not in vc.sessions()), "a session that cannot deliver is still there"
    assert {row.state for row in status_rows(vcsim, tapped)} == {"inactive"}

    relocate(vc, target, home)
    assert wait_for(lambda: received(vc) == both), "the session did not come back with its monitoring VM"


def test_nic_moved_to_another_port_is_re_realized(vc, tapped):
    vm = vc.vm(1)
    old = vc.port_key(vm)
    vc.move_nic(vm, vc.portgroup("DC0_DVPG1"))
    new = vc.port_key(vm)
    assert new != old
    assert wait_for(lambda: new in received(vc)), f"session still mirrors {received(vc)}, not the new port {new}"
    assert old not in received(vc)
    assert sorted(vc.sessions()["vtap:web"].sourcePortTransmitted.portKey) == [vc.port_key(vc.vm(0))]  # VM1 is out only


def test_session_deleted_behind_vtaps_back_is_restored(vc, tapped):
    before = vc.sessions()["vtap:web"]
    vc.reconfigure_vspan("remove", VSPAN.VspanSession(key=before.key))
    assert "vtap:web" not in vc.sessions()
    assert wait_for(lambda: "vtap:web" in vc.sessions()), "the deleted session was not restored"
    after = vc.sessions()["vtap:web"]
    assert after.key != before.key
    assert received(vc) == sorted(before.sourcePortReceived.portKey)


def test_session_edited_behind_vtaps_back_is_put_right(vc, tapped):
    edited = vc.sessions()["vtap:web"]
    edited.mirroredPacketLength = 64
    vc.reconfigure_vspan("edit", edited)
    # The core replaces a binding whose spec differs (remove, then add): wait for the new one.
    assert wait_for(lambda: reverted(vc)), "the edit was not reverted"


def test_flow_moved_away_from_a_monitoring_vm_that_allows_erspan_is_re_realized_as_erspan(vc, vcsim, tapped):
    source, target = vc.vm(2), vc.vm(3)
    home, away = source.runtime.host, vc.hosts()[1]
    assert home == target.runtime.host
    (address,) = [a for n in target.guest.net if n.macAddress == vc.nic(target).macAddress for a in n.ipAddress]
    with connect(vcsim, tapped.state) as client:
        client.create_session("roam", to=f"vm:{target.config.instanceUuid}?encap=erspan")
        client.add_flow("roam", vm=source.config.instanceUuid, direction="both")
    local = vc.sessions()["vtap:roam"]
    assert local.sessionType == "dvPortMirror" and list(local.destinationPort.portKey) == [vc.port_key(target)]

    relocate(vc, source, away)

    def session_type():
        session = vc.sessions().get("vtap:roam")  # none while the core replaces it (remove, then add)
        return session.sessionType if session is not None else None

    assert wait_for(lambda: session_type() == "encapsulatedRemoteMirrorSource"), "the session was not switched to ERSPAN"
    made = vc.sessions()["vtap:roam"]
    assert made.encapType == "erspan2" and list(made.destinationPort.ipAddress) == [address]
    assert not made.destinationPort.portKey
    assert list(made.sourcePortReceived.portKey) == [vc.port_key(source)]
    roam = [row for row in status_rows(vcsim, tapped) if row.session == "roam"]
    assert [row.state for row in roam] == ["active"]

    relocate(vc, source, home)
    assert wait_for(lambda: session_type() == "dvPortMirror"), "back on one host, the session did not return to dvPortMirror"
    with connect(vcsim, tapped.state) as client:
        client.delete_session("roam")
