"""What the fleet tests share: waiting for an agent to act, and reading the mirrors a host's kernel has."""

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
