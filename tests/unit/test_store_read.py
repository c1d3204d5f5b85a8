"""Reading flows back: one parse for all rows, the same flows (and the same refusals) as a parse per row."""

import json

import pytest

from vtap_core.errors import ValidationError
from vtap_core.model import Direction, Source, TapFlow, TapSession
from vtap_core.store import Store


def _store_with_flows(path, count):
    store = Store(path, driver="linux")
    store.put_session(TapSession("web", "port:mon0"))
    for i in range(count):
        store.put_flow(TapFlow(f"f{i:03d}", "web", Source(interface=f"eth{i}"), ("in", "out", "both")[i % 3], "tcp  port\t80" if i % 2 else None))
    return store


def test_flows_read_back_in_order_and_normalized(state_path):
    store = _store_with_flows(state_path, 50)
    flows = store.flows()
    assert [f.name for f in flows] == [f"f{i:03d}" for i in range(50)]
    assert [f.direction for f in flows] == [(Direction.IN, Direction.OUT, Direction.BOTH)[i % 3] for i in range(50)]
    assert {f.filter for f in flows} == {"tcp port 80", None}
    assert [f.source.interface for f in flows] == [f"eth{i}" for i in range(50)]


def test_a_row_holding_two_values_is_refused_not_spread_over_the_others(state_path):
    """One damaged row whose text is two JSON objects must not shift every later flow by one."""
    store = _store_with_flows(state_path, 3)
    two = json.dumps({"name": "f001", "session": "web", "interface": "eth1"}) + "," + json.dumps({"name": "fx", "session": "web", "interface": "ethx"})
    store.db.execute("UPDATE flows SET data=? WHERE name='f001'", (two,))
    with pytest.raises(json.JSONDecodeError):
        store.flows()


def test_a_stored_flow_is_still_validated_when_read(state_path):
    store = _store_with_flows(state_path, 2)
    store.db.execute("UPDATE flows SET data=? WHERE name='f001'", (json.dumps({"name": "f001", "session": "web", "interface": "eth1", "filter": "tcp\x00"}),))
    with pytest.raises(ValidationError, match="control character"):
        store.flows()
    store.db.execute("UPDATE flows SET data=? WHERE name='f001'", (json.dumps({"name": "f001", "session": "web", "interface": "eth1", "direction": "sideways"}),))
    with pytest.raises(ValidationError, match="direction"):
        store.flows()
