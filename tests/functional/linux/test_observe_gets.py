"""observe() gets vtap's filters by handle, many per send, instead of dumping every hook (issue 9, item 13).

vtap asks for a handle named by the mark when it adds a filter. What the kernel
answers is still what counts: a get that does not show the mark where vtap put
it (gone, someone else's filter at that handle, a filter an older vtap added
with a handle the kernel picked) makes observe dump that hook as before.
"""

import errno
import json

from datapaths import tc_only
from tc_lab import lab  # noqa: F401 (the fixture)
from test_scale_reads import dumps  # noqa: F401 (the fixture: dumps the dataplane asks for)
from vtap_core import reconcile
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.linux import tcnl
from vtap_drivers.linux.dataplane import FILTER_PRIO, RTM_GETTFILTER
from vtap_drivers.linux.nlsock import NetlinkFailure

pytestmark = tc_only("cls_bpf filters got by their handles; tcx mirrors are read from their pins")

DEVICES = 12
FOREIGN = ("bpf", "bytecode", "1,6 0 0 262144", "action", "mirred", "egress", "mirror", "dev", "mon0", "continue")


def mirrors(lab, devices=DEVICES, direction="both"):
    lab.standard()
    for i in range(devices):
        lab.veth(f"s{i}", f"p{i}")
    session = TapSession("web", "port:mon0")
    flows = [TapFlow(f"f{i}", "web", Source(interface=f"s{i}"), direction) for i in range(devices)]
    driver = lab.driver()
    reconcile.reconcile(driver, [session], flows)
    return driver, session, flows


def handle_on(lab, device, hook, mark: bytes) -> int:
    """The handle tc shows for the filter carrying this mark."""
    out = lab.tc("-j", "filter", "show", "dev", device, hook).stdout
    (found,) = [f for f in json.loads(out) if mark.hex() in json.dumps(f)]
    return int(found["options"]["handle"], 16)


def test_observe_of_mirrors_in_place_dumps_no_hook(lab, dumps):
    driver, session, flows = mirrors(lab)
    dataplane = lab.dataplane()
    planned = driver.plan([session], flows)
    mark = dataplane.catalog.mark_of(next(b for b in planned if b.get("device") == "s4" and b.get("hook") == "egress"))
    assert handle_on(lab, "s4", "egress", mark) == tcnl.handle_for(mark)  # where vtap asked for it
    dumps.clear()
    observed = driver.observe()
    assert RTM_GETTFILTER not in dumps
    assert len([b for b in observed if b.get("type") == "mirror"]) == 2 * DEVICES
    assert reconcile.reconcile(driver, [session], flows).empty


def test_observe_of_mirrors_named_but_not_added_yet_dumps_no_hook(lab, dumps):
    """What apply looks at after prepare() named the marks: devices without a clsact have no filters to dump."""
    lab.standard()
    for i in range(DEVICES):
        lab.veth(f"s{i}", f"p{i}")
    driver = lab.driver()
    session = TapSession("web", "port:mon0")
    flows = [TapFlow(f"f{i}", "web", Source(interface=f"s{i}"), "both") for i in range(DEVICES)]
    driver.prepare(driver.plan([session], flows))
    dumps.clear()
    assert [b for b in driver.observe() if b.get("type") == "mirror"] == []
    assert RTM_GETTFILTER not in dumps


def test_someone_elses_filter_at_vtaps_handle_is_not_vtaps_mirror(lab, dumps):
    driver, session, flows = mirrors(lab, devices=1, direction="in")
    (mirror,) = [b for b in driver.plan([session], flows) if b.get("type") == "mirror"]
    handle = tcnl.handle_for(lab.dataplane().catalog.mark_of(mirror))
    lab.tc("filter", "del", "dev", "s0", "ingress", "prio", str(FILTER_PRIO), "handle", hex(handle), "bpf")
    lab.tc("filter", "add", "dev", "s0", "ingress", "prio", str(FILTER_PRIO), "handle", hex(handle), *FOREIGN)
    dumps.clear()
    assert [b for b in driver.observe() if b.get("type") == "mirror"] == []
    assert RTM_GETTFILTER in dumps  # the get showed another filter: the hook was dumped
    plan = reconcile.reconcile(driver, [session], flows)
    assert [b.key for b in plan.add] == [mirror.key]
    shown = lab.tc("filter", "show", "dev", "s0", "ingress").stdout
    assert f"pref {FILTER_PRIO} bpf" in shown and f"pref {FILTER_PRIO - 1} bpf" in shown  # theirs kept, ours beside it
    assert [b.key for b in driver.observe() if b.get("type") == "mirror"] == [mirror.key]
    assert reconcile.reconcile(driver, [session], flows).empty


def test_a_filter_with_a_handle_the_kernel_picked_is_still_found(lab):
    """What vtap before handles left in the kernel: the same mark, at handle 1."""
    driver, session, flows = mirrors(lab, devices=1, direction="in")
    (mirror,) = [b for b in driver.plan([session], flows) if b.get("type") == "mirror"]
    mark = lab.dataplane().catalog.mark_of(mirror)
    lab.tc("filter", "del", "dev", "s0", "ingress", "prio", str(FILTER_PRIO), "handle", hex(tcnl.handle_for(mark)), "bpf")
    lab.tc("filter", "add", "dev", "s0", "ingress", "prio", str(FILTER_PRIO), *FOREIGN, "cookie", mark.hex())
    assert handle_on(lab, "s0", "ingress", mark) == 1
    assert [b.key for b in driver.observe() if b.get("type") == "mirror"] == [mirror.key]
    assert reconcile.reconcile(driver, [session], flows).empty


def test_two_marks_asking_for_one_handle_both_get_a_filter(lab, monkeypatch):
    monkeypatch.setattr(tcnl, "handle_for", lambda mark: 5)  # the digests' last four bytes alike
    driver, session, flows = mirrors(lab, devices=1)
    assert len(lab.filter_handles("s0", "ingress")) == 1 and len(lab.filter_handles("s0", "egress")) == 1
    other = TapSession("db", "port:mon0")
    more = flows + [TapFlow("g0", "db", Source(interface="s0"), "in")]
    reconcile.reconcile(driver, [session, other], more)
    handles = lab.filter_handles("s0", "ingress")
    assert len(handles) == 2 and any("handle 0x5 " in line for line in handles)
    assert len([b for b in driver.observe() if b.get("type") == "mirror"]) == 3
    assert reconcile.reconcile(driver, [session, other], more).empty


def test_gets_answer_each_request_with_its_reply_or_its_error(lab):
    driver, session, flows = mirrors(lab, devices=2, direction="in")
    dataplane = lab.dataplane()
    marks = [dataplane.catalog.mark_of(b) for b in driver.plan([session], flows) if b.get("type") == "mirror"]
    index = {name: dataplane.ifindex(name) for name in ("s0", "s1", "mon0")}
    bodies = [
        tcnl.filter_query(index["s0"], "ingress", FILTER_PRIO, tcnl.handle_for(marks[0])),
        tcnl.filter_query(index["mon0"], "ingress", FILTER_PRIO, 1),  # no clsact there
        tcnl.filter_query(index["s1"], "ingress", FILTER_PRIO, tcnl.handle_for(marks[0])),  # not on s1
        tcnl.filter_query(index["s1"], "ingress", FILTER_PRIO, tcnl.handle_for(marks[1])),
    ]
    answers = dict(dataplane.nl.gets(bodies, RTM_GETTFILTER, window=3))
    assert sorted(answers) == [0, 1, 2, 3]
    assert tcnl.read_filter_mark(*answers[0]) == marks[0]
    assert tcnl.read_filter_mark(*answers[3]) == marks[1]
    for failed in (answers[1], answers[2]):
        assert isinstance(failed, NetlinkFailure) and failed.code in (errno.ENOENT, errno.EINVAL)
    dataplane.close()


def test_a_handle_with_its_high_bit_set_is_found_by_its_get(lab, dumps, monkeypatch):
    monkeypatch.setattr(tcnl, "handle_for", lambda mark: 0xFFFFFFF0)  # half of all marks name such a handle
    driver, session, flows = mirrors(lab, devices=1, direction="in")
    assert "handle 0xfffffff0 " in lab.tc("filter", "show", "dev", "s0", "ingress").stdout
    dumps.clear()
    assert len([b for b in driver.observe() if b.get("type") == "mirror"]) == 1
    assert RTM_GETTFILTER not in dumps
