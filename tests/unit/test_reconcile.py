"""The plan is the difference between desired and observed, by key then spec."""

from vtap_core.driver import Binding, Counters
from vtap_core.reconcile import diff


def b(key, spec=(("dev", "eth0"),), vm=None, counters=None):
    return Binding(key=key, session="s", flow="f", vm=vm, spec=spec, counters=counters)


def test_no_op_when_equal_even_with_counters():
    plan = diff([b("a"), b("t", vm=None)], [b("a", counters=Counters(5, 500)), b("t")])
    assert plan.empty and len(plan.keep) == 2


def test_missing_added_orphan_removed_changed_replaced():
    desired = [b("keep"), b("new"), b("changed", spec=(("dev", "eth1"),))]
    observed = [b("keep"), b("orphan"), b("changed")]
    plan = diff(desired, observed)
    assert [x.key for x in plan.add] == ["new", "changed"]
    assert sorted(x.key for x in plan.remove) == ["changed", "orphan"]
    assert [x.key for x in plan.keep] == ["keep"]


def test_scope_limits_to_one_vm_and_session_wide_bindings():
    desired = [b("vm1", vm="u1"), b("vm2", vm="u2"), b("target")]
    observed = [b("old-vm2", vm="u2")]
    plan = diff(desired, observed, scope="u1")
    assert sorted(x.key for x in plan.add) == ["target", "vm1"]
    assert plan.remove == []
