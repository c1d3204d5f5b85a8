"""What the vsphere selector tests share: a client on the simulator, a follower running in a thread,
and the ports a vtap session mirrors, read back from the switch."""

import contextlib
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


@contextlib.contextmanager
def following(vcsim, state):
    """`vtap follow` in a thread, without periodic resyncs (only the watch can act), once its first
    resync is done and its watch has had its first answer; stopped on exit."""
    stop, ready = threading.Event(), threading.Event()

    def follow():
        with connect(vcsim, state) as client:
            follower = Follower(client, interval=300)
            threading.Thread(target=lambda: (wait_for(lambda: follower.resyncs >= 1, 30), ready.set()), daemon=True).start()
            follower.run(stop)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the follower did not finish its first resync"
        time.sleep(1.0)  # the watch's first answer is the current state
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
