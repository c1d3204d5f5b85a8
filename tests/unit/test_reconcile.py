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


class _RecordingDriver:
    """Two VMs on a platform that keeps nothing: records the flows each plan() was given."""

    def __init__(self):
        from vtap_core.model import VM, Nic

        self.vms = [VM(f"00000000-0000-0000-0000-00000000000{i}", f"web-{i}", "running", nics=(Nic(f"52:54:00:00:00:0{i}", f"vnet{i}"),)) for i in (1, 2)]
        self.planned = []

    def inventory(self):
        return self.vms

    def plan(self, sessions, flows):
        flows = list(flows)
        self.planned.append(sorted(f.name for f in flows))
        return [Binding(key=f.name, session=f.session, flow=f.name, vm=f.source.vm, spec=()) for f in flows]

    def observe(self):
        return []

    def apply(self, bindings):
        pass

    def remove(self, bindings):
        pass


class _FocusingDriver(_RecordingDriver):
    def focus(self, vm):
        self.focused = vm


def _selector_reconcile(driver, scope):
    from vtap_core.model import Source, TapFlow, TapSession
    from vtap_core.reconcile import reconcile

    plan = reconcile(driver, [TapSession("s", "port:mon0")], [TapFlow("f", "s", Source(select="name=web-*"))], scope)
    return driver.planned[-1], plan


def test_a_scoped_reconcile_plans_only_that_vms_members_when_the_driver_focuses():
    driver = _FocusingDriver()
    one = driver.vms[0].uuid
    planned, plan = _selector_reconcile(driver, one)
    assert planned == [f"f@{one}#52:54:00:00:00:01"]
    assert len(plan.members["f"]) == 2 and [b.key for b in plan.add] == planned  # membership stays whole
    assert driver.focused is None  # told the reconcile is over


def test_a_driver_without_focus_plans_every_member_even_when_scoped():
    driver = _RecordingDriver()  # vsphere: flows share their switch's session options
    planned, _ = _selector_reconcile(driver, driver.vms[0].uuid)
    assert len(planned) == 2
