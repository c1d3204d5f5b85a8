"""parse_document: what an `apply` file says, checked whole before anything changes."""

import pytest

from vtap_core.client import parse_document
from vtap_core.errors import ValidationError


def doc(*sessions):
    return {"sessions": [{"name": name, "to": f"port:mon{i}", "flows": flows} for i, (name, flows) in enumerate(sessions)]}


def test_a_flow_name_listed_in_two_sessions_is_refused_where_it_repeats():
    with pytest.raises(ValidationError) as caught:
        parse_document(doc(("a", [{"name": "x", "interface": "eth0"}]), ("b", [{"interface": "eth1"}, {"name": "x", "interface": "eth2"}])))
    assert str(caught.value).startswith("sessions[1].flows[1]: flow 'x' is listed twice")


def test_unnamed_flows_get_the_smallest_free_number_of_their_session():
    sessions, flows = parse_document(
        doc(("s", [{"name": "s-2", "interface": "eth0"}, {"interface": "eth1"}, {"interface": "eth2"}, {"interface": "eth3"}]), ("t", [{"interface": "eth4"}]))
    )
    assert [f.name for f in flows] == ["s-2", "s-1", "s-3", "s-4", "t-1"]
    assert list(sessions) == ["s", "t"]


def test_an_unnamed_flow_can_collide_with_a_name_listed_later():
    with pytest.raises(ValidationError, match=r"sessions\[0\].flows\[1\]: flow 's-1' is listed twice"):
        parse_document(doc(("s", [{"interface": "eth0"}, {"name": "s-1", "interface": "eth1"}])))


def test_ten_thousand_flows_come_back_in_file_order():
    entries = [{"interface": f"eth{i}", "filter": f"tcp port {i + 1}"} for i in range(10_000)]
    _, flows = parse_document(doc(("s", entries)))
    assert [f.name for f in flows] == [f"s-{i + 1}" for i in range(10_000)]
    assert flows[-1].filter == "tcp port 10000"


def test_the_gc_pause_of_a_large_load_ends_with_it_even_on_an_error():
    import gc

    from vtap_core.client import paused_gc

    assert gc.isenabled()
    with pytest.raises(ValidationError):
        with paused_gc():
            assert not gc.isenabled()
            parse_document({"sessions": "not a list"})
    assert gc.isenabled()
