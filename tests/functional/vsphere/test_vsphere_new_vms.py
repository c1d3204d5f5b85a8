"""VMs created and cloned while `vtap follow` runs (the project's simulator binds their NICs to
distributed ports as vCenter does): a VM whose name matches a selector flow is tapped, one that does
not match is not, and a VM renamed out of the selector is untapped."""

import threading
import time

from vtap_core.client import Client
from vtap_core.follow import Follower


def connect(vcsim, state):
    return Client(driver="vsphere", state=state, url=vcsim.url, user=vcsim.user, password=vcsim.password)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def mirrored_ports(vc, name):
    session = vc.sessions().get(f"vtap:{name}")
    if session is None:
        return set()
    return set(session.sourcePortReceived.portKey or []) | set(session.sourcePortTransmitted.portKey or [])


def test_created_and_cloned_vms_are_tapped_while_the_follower_runs(vc, vcsim, tmp_path):
    state = str(tmp_path / "s.db")
    with connect(vcsim, state) as client:
        client.create_session("web", to="gre://192.0.2.44")
        client.add_flow("web", select="name=web-*")
    assert mirrored_ports(vc, "web") == set()
    stop = threading.Event()
    follower_ready = threading.Event()

    def follow():
        with connect(vcsim, state) as client:
            follower = Follower(client, interval=300)  # no periodic resync: only the watch can tap them
            threading.Thread(target=lambda: (wait_for(lambda: follower.resyncs >= 1, 30), follower_ready.set()), daemon=True).start()
            follower.run(stop)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    made = []
    try:
        assert follower_ready.wait(30)
        time.sleep(1.0)  # the watch's first answer is the current state
        created = vc.create_vm("web-created")
        made.append(created)
        other = vc.create_vm("db-created")
        made.append(other)
        clone = vc.clone_vm(created, "web-clone")
        made.append(clone)
        keys = {vm.name: vc.port_key(vm) for vm in made}
        assert len(set(keys.values())) == 3 and all(keys.values()), keys  # each NIC on a port of its own
        wanted = {keys["web-created"], keys["web-clone"]}
        assert wait_for(lambda: mirrored_ports(vc, "web") == wanted), (mirrored_ports(vc, "web"), keys)
        time.sleep(1.0)
        assert keys["db-created"] not in mirrored_ports(vc, "web")

        vc.wait(clone.Rename_Task("db-clone"))
        assert wait_for(lambda: mirrored_ports(vc, "web") == {keys["web-created"]}), "the renamed clone stayed tapped"
    finally:
        stop.set()
        thread.join(timeout=15)
        with connect(vcsim, state) as client:
            client.delete_session("web")
        for vm in made:
            vc.wait(vm.Destroy_Task())
