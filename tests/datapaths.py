"""The Linux data path a test runs on: the `datapath` fixture (conftest.py) is tc unless a test says more.

Tests of behaviour (copies arrive, status, drift, faults) take @on_both_datapaths and run once per
data path; tests of tc's own structures (clsact, cls_bpf, mirred, priorities, handles) stay on tc
and say why with @tc_only("..."). A plain module, not conftest: tests/functional/cli has a conftest
of its own that would shadow this one's name.
"""

import os

import pytest

DATAPATHS = ("tc", "tcx")
on_both_datapaths = pytest.mark.parametrize("datapath", DATAPATHS)


def tc_only(reason: str):
    """Marks a test that checks tc's own structures, which tcx does not have; `reason` says which."""
    return pytest.mark.tc_only(reason=reason)


def remove_pins(netns: str) -> None:
    """bpffs outlives the namespace: detach and unpin whatever a tcx test left in its pin dir."""
    from vtap_drivers.linux import tcxmirror

    directory = tcxmirror.pin_dir(netns)
    if os.path.isdir(directory):
        with tcxmirror.in_netns(netns):
            for name in os.listdir(directory):
                tcxmirror.detach(os.path.join(directory, name))
        os.rmdir(directory)
