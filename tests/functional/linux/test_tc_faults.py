"""The tc dataplane under faults: its catalog written before the kernel, never naming others' qdiscs."""

import os

import pytest

from datapaths import on_both_datapaths, tc_only
from tc_lab import lab  # noqa: F401 (lab: the fixture)
from vtap_core import reconcile
from vtap_core.errors import OperationFailed
from vtap_core.model import Source, TapFlow, TapSession


@on_both_datapaths
def test_prepare_names_everything_so_apply_writes_nothing(lab):
    lab.standard()
    driver = lab.driver()
    bindings = driver.plan([TapSession("web", "vxlan://192.0.2.7?vni=5")], [TapFlow("f1", "web", Source(interface="src0"), "both")])
    driver.prepare(bindings)
    path = os.path.join(lab.state_dir, f"tc-{lab.netns}.json")
    written = os.stat(path).st_mtime_ns, open(path).read()
    assert "clsact" not in lab.qdiscs("src0")  # named, not yet made
    driver.apply(bindings)
    assert (os.stat(path).st_mtime_ns, open(path).read()) == written
    assert lab.mirrors("src0", "ingress") == 1 and lab.mirrors("src0", "egress") == 1
    assert reconcile.diff(bindings, driver.observe()).empty


@on_both_datapaths
def test_a_failed_apply_forgets_the_qdiscs_it_did_not_add(lab):
    lab.standard()
    driver = lab.driver()
    bindings = driver.plan([TapSession("web", "port:mon0")], [TapFlow("f1", "web", Source(interface="src0"), "in")])
    driver.prepare(bindings)
    lab.ip("link", "del", "mon0")  # the target goes between plan and apply
    with pytest.raises(OperationFailed, match="mon0 does not exist"):
        driver.apply(bindings)
    # Someone else now adds an empty clsact on src0: it is theirs, never taken for a vtap orphan.
    lab.tc("qdisc", "add", "dev", "src0", "clsact")
    assert driver.observe() == []
    reconcile.reconcile(driver, [], [])
    assert "clsact" in lab.qdiscs("src0")


@tc_only("the clsact qdisc vtap adds for its filters")
def test_an_empty_clsact_vtap_added_is_an_orphan_until_removed(lab):
    lab.standard()
    driver = lab.driver()
    session, flow = TapSession("web", "port:mon0"), TapFlow("f1", "web", Source(interface="src0"), "in")
    reconcile.reconcile(driver, [session], [flow])
    lab.tc("filter", "del", "dev", "src0", "ingress")  # what a run killed between filter and qdisc leaves
    (orphan,) = driver.observe()
    assert orphan.key == f"clsact/{lab.netns}/src0"
    assert reconcile.reconcile(driver, [], []).summary()["removed"] == 1
    assert "clsact" not in lab.qdiscs("src0")
    assert driver.observe() == []
