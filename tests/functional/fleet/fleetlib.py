"""What the fleet tests (and bench/vsphere_election.py) share: waiting for an agent to act, reading the
mirrors a host's kernel has, and writing desired state as another machine's admin tool would."""

import json
import subprocess
import time


def wait_for(predicate, seconds=15.0, step=0.2):
    """The predicate's first true value within `seconds` (agents act asynchronously), else its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def mirrors_on(netns: str) -> list:
    """The devices eth0's ingress filters in `netns` mirror to, read back from the kernel."""
    out = subprocess.run(["tc", "-n", netns, "-j", "filter", "show", "dev", "eth0", "ingress"], capture_output=True, text=True)
    filters = json.loads(out.stdout or "[]") if out.returncode == 0 else []
    return [a.get("to_dev") for f in filters if "options" in f for a in f["options"].get("actions", [])]


def desire(store, session=None, flow=None, command="test: desire"):
    """Add a session and/or flow (dicts as in YAML) to the desired state only, nothing applied: followers must realize it.

    Guarded as every change is (compare-and-swap): a racing writer makes it read again.
    """
    from vtap_core.model import TapFlow, TapSession
    from vtap_core.stores import Conflict

    for _ in range(10):
        sessions, flows = store.snapshot()
        sessions += [TapSession.from_dict(session)] if session else []
        flows += [TapFlow.from_dict(flow)] if flow else []
        try:
            with store.transaction():
                store.replace_all(sessions, flows)
                store.record(command, {"session": session, "flow": flow})
            return
        except Conflict:
            continue
    raise AssertionError("could not write the desired state")
