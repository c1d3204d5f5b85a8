"""The tc dataplane keeps its own copies of netlink numbers so that importing it does not import pyroute2
(a hookscript's post-start must start fast): they must equal pyroute2's (the kernel's)."""

import subprocess
import sys


def test_netlink_numbers_equal_pyroute2s():
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, rtnl

    from vtap_drivers.linux import dataplane

    assert (dataplane.NLM_F_REQUEST, dataplane.NLM_F_ACK, dataplane.NLM_F_EXCL, dataplane.NLM_F_CREATE, dataplane.NLM_F_DUMP) == (
        NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP)
    for name in ("RTM_GETLINK", "RTM_NEWQDISC", "RTM_DELQDISC", "RTM_GETQDISC", "RTM_NEWTFILTER", "RTM_DELTFILTER", "RTM_GETTFILTER", "RTM_GETACTION"):
        assert getattr(dataplane, name) == getattr(rtnl, name), name


def test_importing_the_dataplane_does_not_import_pyroute2():
    code = "import sys, vtap_drivers.linux.dataplane; print(sorted(m for m in sys.modules if m.startswith('pyroute2')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
