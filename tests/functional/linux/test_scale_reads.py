"""What a command reads from the kernel does not grow with the flows it does not touch (issue 9, item 13).

The netlink socket is the real one; the tests only count the dumps it is asked for.
"""

import pytest

from tc_lab import lab  # noqa: F401 (the fixture)
from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux import tcnl
from vtap_drivers.linux.dataplane import DUMP, NLM_F_DUMP, RTM_GETACTION, RTM_GETLINK, RTM_GETQDISC
from vtap_drivers.linux.nlsock import RtnlSocket, attributes

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


def test_status_and_a_reconcile_read_the_links_and_the_qdiscs_once(lab, dumps):
    """Plan and observe share one look at the namespace: one link dump and one qdisc dump, not two of each."""
    from vtap_core.client import Client

    session, flows = many(lab)
    document = {"sessions": [{"name": "web", "to": "port:mon0", "flows": [{"name": f.name, "interface": f.source.interface, "direction": "both"} for f in flows]}]}
    with Client(driver="linux", state=f"{lab.state_dir}/state.db", netns=lab.netns) as vtap:
        vtap.apply_document(document)
        dumps.clear()
        rows = vtap.status()
        assert (dumps.count(RTM_GETLINK), dumps.count(RTM_GETQDISC)) == (1, 1)
        assert {row.flow: (row.state, row.observed) for row in rows} == {f.name: ("active", 2) for f in flows}
        dumps.clear()
        assert vtap.reconcile().empty
        assert (dumps.count(RTM_GETLINK), dumps.count(RTM_GETQDISC)) == (1, 1)
        lab.ip("link", "set", "s5", "down")
        lab.ip("link", "set", "s5", "name", "s5renamed")  # its filters go with it, seen on the shared look
        dumps.clear()
        rows = [(row.flow, row.state, row.source) for row in vtap.status() if row.state != "active"]
        assert rows == [("f5", "inactive", "interface s5"), ("f5", "orphan", "s5renamed")]
        assert (dumps.count(RTM_GETLINK), dumps.count(RTM_GETQDISC)) == (1, 1)
        plan = vtap.reconcile()
        assert sorted(b.key.split("/")[-4] for b in plan.remove) == ["s5", "s5"]
    assert lab.filter_handles("s5renamed", "ingress") == [] and lab.filter_handles("s5renamed", "egress") == []


def test_the_action_dump_comes_in_full_replies_and_reads_as_each_action_alone(lab):
    """The kernel walks its action table from the start for every reply of an action dump: at its default
    of 32 actions a reply, reading 20,000 of them is quadratic. vtap asks for full replies."""
    lab.standard()
    devices = 40
    for i in range(devices):
        lab.veth(f"s{i}", f"p{i}")
    session = TapSession("web", "port:mon0")
    flows = [TapFlow(f"f{i}", "web", Source(interface=f"s{i}"), "both") for i in range(devices)]
    reconcile.reconcile(lab.driver(), [session], flows)
    dataplane = lab.dataplane()
    replies = dataplane.nl.dump(tcnl.mirred_dump_request(), RTM_GETACTION, DUMP)
    assert len(replies) < 2 * devices / 32
    read = [action for reply in replies for action in tcnl.read_mirred_actions(*reply)]
    one_by_one = []
    for data, start, end in replies:  # the general reader, action by action
        tab = attributes(data, start + tcnl.TCAMSG_SIZE, end)[tcnl.TCA_ROOT_TAB]
        one_by_one += [tcnl.read_mirred(data, span) for span in attributes(data, *tab).values()]
    assert read == one_by_one and len(read) == 2 * devices
    assert {to for _, to, *_ in read} == {dataplane.ifindex("mon0")}
