"""Make vswitchd drop its cached datapath flows after a Mirror changes.

Open vSwitch 3.1 (Debian 12) does not update datapath flows that are already
installed when a Mirror row is added or removed: traffic that keeps flowing
keeps its old actions, so a new mirror copies nothing of it (and a removed one
keeps copying) until the flows expire. Seen on the kernel datapath
(tests/kernel/test_ovs_datapath.py, in the stock-kernel lane) and on the
userspace one. `revalidator/purge` makes vswitchd delete them; the next packet
of each flow is translated again, with the mirror.

vswitchd is asked over its unixctl socket (JSON-RPC, the `ovs` library's
client) in the run directory of the ovsdb socket vtap uses (or the default
/var/run/openvswitch): <rundir>/ovs-vswitchd.<pid>.ctl.
"""

from __future__ import annotations

import os

DEFAULT_RUNDIR = "/var/run/openvswitch"


def vswitchd_control_socket(remote: str) -> str | None:
    rundir = os.path.dirname(remote[len("unix:"):]) if remote.startswith("unix:") else DEFAULT_RUNDIR
    try:
        with open(os.path.join(rundir, "ovs-vswitchd.pid")) as pidfile:
            pid = int(pidfile.read().strip())
    except (OSError, ValueError):
        return None
    path = os.path.join(rundir, f"ovs-vswitchd.{pid}.ctl")
    return path if os.path.exists(path) else None


def purge_datapath_flows(remote: str) -> str | None:
    """Ask vswitchd to drop its datapath flows; returns why not (None when done)."""
    from ovs.unixctl.client import UnixctlClient

    path = vswitchd_control_socket(remote)
    if path is None:
        return "no ovs-vswitchd control socket found next to the ovsdb socket"
    error, client = UnixctlClient.create(path)
    if error:
        return f"{path}: {os.strerror(error)}"
    try:
        error, reply_error, _ = client.transact("revalidator/purge", [])
    finally:
        client.close()
    if error:
        return f"{path}: {os.strerror(error)}"
    return reply_error or None
