"""Store.replace_all: the whole desired state in one go, with put_session/put_flow's rules."""

import pytest

from vtap_core.errors import AlreadyExists, NotFound
from vtap_core.model import Source, TapFlow, TapSession
from vtap_core.store import Store


def state(n):
    sessions = [TapSession("a", "port:mon0"), TapSession("b", "vxlan://192.0.2.1?vni=5", sample=4)]
    flows = [TapFlow(f"f{i}", "ab"[i % 2], Source(interface=f"eth{i}"), "in", f"tcp port {i + 1}") for i in range(n)]
    return sessions, flows


def test_replace_all_round_trips_and_keeps_other_drivers_rows(state_path):
    store, other = Store(state_path, driver="linux"), Store(state_path, driver="kvm")
    with other.transaction():
        other.replace_all([TapSession("k", "port:x")], [])
    sessions, flows = state(1000)
    with store.transaction():
        store.replace_all(sessions, flows)
    assert store.sessions() == sessions
    assert sorted(store.flows(), key=lambda f: int(f.name[1:])) == flows
    assert [s.name for s in other.sessions()] == ["k"]


@pytest.mark.parametrize(
    "broken, error",
    [
        (lambda s, f: (s, f + [TapFlow("lost", "nope", Source(interface="eth0"))]), NotFound),
        (lambda s, f: (s + [TapSession("c", "port:mon9")], f), AlreadyExists),
        (lambda s, f: (s, f + [f[0]]), AlreadyExists),
    ],
    ids=["flow-without-session", "session-twice", "flow-twice"],
)
def test_a_refused_state_leaves_the_store_as_it_was(state_path, broken, error):
    store = Store(state_path)
    sessions, flows = state(10)
    with store.transaction():
        store.replace_all(sessions, flows)
    with pytest.raises(error):
        with store.transaction():
            store.replace_all(*broken([TapSession("c", "port:mon1")], [TapFlow("g", "c", Source(interface="eth9"))]))
    assert store.sessions() == sessions
    assert len(store.flows()) == 10
