"""The selector language and its expansion, on inventory objects (no platform needed)."""

import pytest

from vtap_core import selectors
from vtap_core.errors import ValidationError
from vtap_core.model import VM, Nic, Source, TapFlow, TapSession

WEB1 = VM("00000000-0000-0000-0000-000000000001", "web-1", "running", host="h1", nics=(Nic("52:54:00:00:00:01", "vnet1", "dmz"), Nic("52:54:00:00:00:11", "vnet11", "mgmt")), tags=("pci",))
WEB2 = VM("00000000-0000-0000-0000-000000000002", "web-2", "running", host="h2", nics=(Nic("52:54:00:00:00:02", "vnet2", "dmz"),), tags=("lab",))
DB = VM("00000000-0000-0000-0000-000000000003", "db", "running", host="h1", nics=(Nic("52:54:00:00:00:03", "vnet3", "dmz"),))
MON = VM("00000000-0000-0000-0000-000000000004", "web-mon", "running", host="h1", nics=(Nic("52:54:00:00:00:04", "vnet4", "dmz"),))


def members(expression, session=None, cap=1000, vms=(WEB1, WEB2, DB, MON)):
    session = session or TapSession("s", "port:mon0")
    flow = TapFlow("f", "s", Source(select=expression))
    return [(m.vm_name, m.nic) for m in selectors.members_of(flow, session, list(vms), cap)]


def test_glob_and_tags_and_negation():
    assert members("name=web-?") == [("web-1", "52:54:00:00:00:01"), ("web-1", "52:54:00:00:00:11"), ("web-2", "52:54:00:00:00:02")]
    assert members("tag=pci") == [("web-1", "52:54:00:00:00:01"), ("web-1", "52:54:00:00:00:11")]
    # A VM without any tag satisfies tag!=lab.
    assert [n for n, _ in members("name=web-*,tag!=lab")] == ["web-1", "web-1", "web-mon"]
    assert members("host=h2") == [("web-2", "52:54:00:00:00:02")]


def test_network_term_narrows_the_nics():
    assert members("name=web-1,network=dmz") == [("web-1", "52:54:00:00:00:01")]


def test_the_sessions_target_vm_is_never_a_member():
    session = TapSession("s", f"vm:{MON.uuid}")
    assert "web-mon" not in [n for n, _ in members("name=web-*", session)]


def test_over_the_cap_is_refused():
    with pytest.raises(ValidationError, match="matches 4 NICs, more than the cap of 3"):
        members("name=*,host=h1", cap=3)


@pytest.mark.parametrize("bad, why", [
    ("colour=red", "unknown key 'colour'"),
    ("name=[web", "never closed"),
    ("name", "not a selector term"),
    ("name=web,", "not a selector term"),
    ("", "exactly one of"),
])
def test_bad_expressions_name_the_rule(bad, why):
    with pytest.raises(ValidationError, match=why):
        Source(select=bad)


def test_expression_is_kept_canonical_and_round_trips():
    flow = TapFlow("f", "s", Source(select=" name = web-* ,tag!=lab"))
    assert flow.source.select == "name=web-*,tag!=lab"
    assert TapFlow.from_dict(flow.to_dict()) == flow


def test_membership_changes_say_who_joined_and_left():
    before = {"f": {"a#1": "a: name=a*"}}
    after = {"f": {"b#1": "b: name=b*"}}
    assert selectors.membership_changes(before, after) == [
        {"flow": "f", "joined": "b#1", "why": "b: name=b*"},
        {"flow": "f", "left": "a#1", "why": "no longer matches (or is gone)"},
    ]


def test_a_vm_read_again_is_matched_again_and_the_memo_keeps_only_the_vms_of_the_last_read():
    from dataclasses import replace

    memo = selectors.MatchMemo()
    session, flow = TapSession("s", "port:mon0"), TapFlow("f", "s", Source(select="tag=pci"))
    assert [m.vm_name for m in selectors.members_of(flow, session, [WEB1, WEB2, DB], 1000, memo)] == ["web-1", "web-1"]
    retagged = replace(WEB2, tags=("pci",))  # the driver read WEB2 again after an event: a new object
    assert [m.vm_name for m in selectors.members_of(flow, session, [WEB1, retagged, DB], 1000, memo)] == ["web-1", "web-1", "web-2"]
    untagged = replace(WEB1, tags=())
    assert [m.vm_name for m in selectors.members_of(flow, session, [untagged, retagged], 1000, memo)] == ["web-2"]
    assert {vm.name for vm, _, _ in memo._by_select["tag=pci"].values()} == {"web-1", "web-2"}  # DB, gone, is forgotten


def test_a_scoped_expansion_lists_every_member_and_makes_member_flows_for_that_vm_only():
    session = TapSession("s", "port:mon0")
    flows = [TapFlow("f", "s", Source(select="name=web-*")), TapFlow("plain", "s", Source(vm=DB.uuid))]
    vms = [WEB1, WEB2, DB, MON]
    scoped = selectors.expand([session], flows, lambda: vms, scope=WEB2.uuid)
    assert len(scoped.members["f"]) == 4  # web-1 (two NICs), web-2, web-mon: membership stays whole
    assert sorted(f.name for f in scoped.flows) == sorted(["plain", f"f@{WEB2.uuid}#52:54:00:00:00:02"])
    # A scope no VM answers to (undefined meanwhile) narrows nothing.
    unknown = selectors.expand([session], flows, lambda: vms, scope="00000000-0000-0000-0000-0000000000ff")
    assert len(unknown.flows) == 5
