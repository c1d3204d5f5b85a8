"""What a command reads from the kernel does not grow with the flows it does not touch (issue 9, item 13).

The netlink socket is the real one; the tests only count the dumps it is asked for.
"""

import pytest

from tc_lab import lab  # noqa: F401 (the fixture)
from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux.dataplane import NLM_F_DUMP, RTM_GETQDISC
from vtap_drivers.linux.nlsock import RtnlSocket

DEVICES = 12  # more than dataplane.FEW_DEVICES: plans of all of them read the namespace in one dump


@pytest.fixture
def dumps(monkeypatch):
    """The message types of the dumps the dataplane asks its socket for, in order."""
    asked = []
    replies = RtnlSocket._replies

    def counted(self, body, msg_type, flags):
        if flags & NLM_F_DUMP == NLM_F_DUMP:
            asked.append(msg_type)
        return replies(self, body, msg_type, flags)

    monkeypatch.setattr(RtnlSocket, "_replies", counted)
    return asked


def many(lab):
    lab.standard()
    for i in range(DEVICES):
        lab.veth(f"s{i}", f"p{i}")
    lab.tc("qdisc", "add", "dev", "s3", "ingress")  # its egress filters go on the root qdisc
    lab.tc("qdisc", "add", "dev", "s3", "root", "handle", "1:", "htb")
    session = TapSession("web", "port:mon0")
    return session, [TapFlow(f"f{i}", "web", Source(interface=f"s{i}"), "both") for i in range(DEVICES)]


def test_a_plan_of_one_flow_looks_up_its_devices_without_a_dump_and_places_it_the_same(lab, dumps):
    session, flows = many(lab)
    driver = lab.driver()
    planned_with_all = {b.key: b for b in driver.plan([session], flows)}
    assert dumps, "a plan of many devices reads the namespace in one dump"
    for flow in (flows[3], flows[5]):
        dumps.clear()
        alone = driver.plan([session], [flow])
        assert dumps == []
        assert alone and all(planned_with_all[b.key] == b for b in alone)
    assert {b.get("hook"): b.get("parent") for b in driver.plan([session], [flows[3]])} == {"ingress": None, "egress": "1:"}


def test_a_change_plans_its_desired_state_once_for_the_catalog_and_the_reconcile(lab, monkeypatch):
    from vtap_core.client import Client

    session, flows = many(lab)
    planned = []
    desired_bindings = reconcile.desired_bindings

    def counted(driver, sessions, flows, *args, **kwargs):
        planned.append(len(flows))
        return desired_bindings(driver, sessions, flows, *args, **kwargs)

    monkeypatch.setattr(reconcile, "desired_bindings", counted)
    with Client(driver="linux", state=f"{lab.state_dir}/state.db", netns=lab.netns) as vtap:
        vtap.create_session("web", to="port:mon0")
        planned.clear()
        vtap.add_flow("web", interface="s1", direction="both", name="f1")
        assert planned == [1]
        assert [(row.flow, row.state) for row in vtap.status()] == [("f1", "active")]
    assert len(lab.filter_handles("s1", "ingress")) == 1 and len(lab.filter_handles("s1", "egress")) == 1


def test_prepare_reads_no_qdiscs_of_devices_whose_clsact_the_catalog_names(lab, dumps):
    session, flows = many(lab)
    driver = lab.driver()
    reconcile.reconcile(driver, [session], flows)
    dumps.clear()
    driver.prepare(driver.plan([session], flows))
    assert dumps.count(RTM_GETQDISC) == 1  # the plan's own look; prepare adds none
    plan = reconcile.reconcile(driver, [session], flows)
    assert plan.empty and len(plan.keep) == 2 * DEVICES
