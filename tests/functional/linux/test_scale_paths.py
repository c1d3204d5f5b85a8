"""The paths made fast for thousands of flows still give the right answers on a real kernel."""

import json

from tc_lab import lab  # noqa: F401 (the fixture)


def test_the_names_only_link_dump_sees_every_device_with_its_index(lab):
    lab.standard()
    lab.veth("a-fifteen-chars", "vtapx0123456789")
    dataplane = lab.dataplane()
    shown = {link["ifname"]: link["ifindex"] for link in json.loads(lab.ip("-j", "link", "show").stdout)}
    assert dataplane.devices() == set(shown)
    assert dataplane._link_indexes() == shown


def test_the_brief_link_read_agrees_with_the_whole_one_and_reads_vtaps_own_devices_whole(lab):
    lab.standard()
    lab.ip("link", "set", "mon0", "mtu", "1400")
    lab.ip("link", "set", "src0", "down")
    lab.veth("vtapx0123456789", "other")
    lab.ip("link", "set", "vtapx0123456789", "alias", "vtap:" + "00" * 16)
    dataplane = lab.dataplane()
    whole = {link["index"]: link for link in dataplane._links()}
    brief = dataplane._brief_links()
    assert sorted(link["index"] for link in brief) == sorted(whole)
    for link in brief:
        if link["name"] == "vtapx0123456789":
            assert link == whole[link["index"]]  # kind, alias, counters: observe reads vtap's devices by them
        else:
            assert link["brief"] and {k: link[k] for k in ("name", "flags", "mtu")} == {k: whole[link["index"]][k] for k in ("name", "flags", "mtu")}
    assert {link["name"]: link["mtu"] for link in brief}["mon0"] == 1400


def test_status_rows_belong_to_their_own_flows_across_sessions(lab):
    """Bindings are grouped by (session, flow) once: each row counts only its own filters."""
    from vtap_core.client import Client

    lab.standard()
    lab.veth("src1", "peer1")
    lab.veth("mon2", "mon3")
    with Client(driver="linux", state=f"{lab.state_dir}/state.db", netns=lab.netns) as vtap:
        vtap.apply_document(
            {
                "sessions": [
                    {"name": "a", "to": "port:mon0", "flows": [{"name": "a1", "interface": "src0", "direction": "both"}, {"name": "a2", "interface": "src1", "direction": "in"}]},
                    {"name": "b", "to": "port:mon2", "flows": [{"name": "b1", "interface": "src0", "direction": "out", "filter": "udp"}]},
                ]
            }
        )
        lab.tc("filter", "del", "dev", "src1", "ingress")  # a2's only filter, deleted behind vtap's back
        status = vtap.status()
        rows = {row.flow: (row.session, row.state, row.desired, row.observed) for row in status if row.state != "orphan"}
        assert rows == {"a1": ("a", "active", 2, 2), "a2": ("a", "missing", 1, 0), "b1": ("b", "active", 1, 1)}
        # The clsact vtap added on src1 holds no filter now: an orphan of its own, not a2's row.
        assert [row.source for row in status if row.state == "orphan"] == ["src1"]


def test_apply_with_prune_drops_other_sessions_and_their_flows(lab):
    from vtap_core.client import Client

    lab.standard()
    lab.veth("mon2", "mon3")
    with Client(driver="linux", state=f"{lab.state_dir}/state.db", netns=lab.netns) as vtap:
        vtap.create_session("old", to="port:mon2")
        vtap.add_flow("old", interface="src0", direction="in", name="o1")
        vtap.create_session("kept", to="port:mon0")
        vtap.add_flow("kept", interface="src0", direction="in", name="k1")
        vtap.apply_document({"sessions": [{"name": "kept", "to": "port:mon0", "flows": [{"name": "k2", "interface": "src0", "direction": "out"}]}]}, prune=True)
        assert [s.name for s in vtap.sessions()] == ["kept"]
        assert [(f.session, f.name) for f in vtap.flows()] == [("kept", "k2")]
        assert [(row.flow, row.state) for row in vtap.status()] == [("k2", "active")]
    assert lab.filter_handles("src0", "ingress") == []
    assert len(lab.filter_handles("src0", "egress")) == 1


def test_a_plan_reused_within_a_change_still_sees_a_device_that_went(lab):
    """The second plan of a change reuses the first only for the same sessions, flows and devices."""
    import pytest

    from vtap_core.errors import NotFound
    from vtap_core.model import Source, TapFlow, TapSession

    lab.standard()
    lab.veth("src1", "peer1")
    driver = lab.driver()
    session = TapSession("s", "port:mon0")
    flows = [TapFlow("a", "s", Source(interface="src0"), "in"), TapFlow("b", "s", Source(interface="src1"), "in")]
    first = driver.plan([session], flows)
    assert driver.plan([session], flows) == first
    assert [b.flow for b in driver.plan([session], flows[:1])] == ["a"]  # other flows: planned anew
    lab.ip("link", "del", "src1")
    with pytest.raises(NotFound, match="src1"):
        driver.plan([session], flows)
