"""The lane's guest really is Debian's kernel, with the device types this machine lacks."""

import platform
import subprocess

from .lane import lane_only

pytestmark = lane_only


def test_guest_runs_the_debian_kernel():
    assert platform.release().endswith("-amd64")


def test_guest_has_gretap_erspan_dummy_vlan(netns):
    for kind, extra in (("gretap", "remote 192.0.2.1"), ("erspan", "remote 192.0.2.1 seq key 1 erspan_ver 1 erspan 7"), ("dummy", ""), ("ip6gretap", "remote 2001:db8::1")):
        subprocess.run(f"ip -n {netns} link add t-{kind} type {kind} {extra}", shell=True, check=True)
