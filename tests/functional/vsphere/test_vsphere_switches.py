"""One TapSession over two distributed switches: one VspanSession on each, nothing shared."""

import pytest
from pyVmomi import vim

from vcenter import Vcenter
from vcsim_simulator import module_simulator
from vtap_core.errors import ValidationError
from vtap_core.model import Source, TapFlow, TapSession


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    from vtap_drivers.vsphere.driver import VsphereDriver

    for sim in module_simulator(datacenters=2, hosts=2, vms=2):
        driver = VsphereDriver(url=sim.url, user=sim.user, password=sim.password, state_dir=str(tmp_path_factory.mktemp("vtap")))
        yield driver, Vcenter(sim.connect())
        driver.close()


def by_switch(vc):
    """{switch uuid: {session name: session}} and {VM name: (switch uuid, port key)}."""
    switches = {s.uuid: {v.name: v for v in s.config.vspanSession or ()} for s in vc.all(vim.DistributedVirtualSwitch)}
    ports = {vm.name: (vc.nic(vm).backing.port.switchUuid, vc.port_key(vm)) for vm in vc.vms()}
    return switches, ports


def test_a_session_over_two_switches_is_one_vspan_session_on_each(two):
    driver, vc = two
    dc0, dc1 = vc.vms()[0], vc.vms()[2]
    assert dc0.name.startswith("DC0") and dc1.name.startswith("DC1")
    flows = [TapFlow("a", "wide", Source(vm=dc0.config.instanceUuid)), TapFlow("b", "wide", Source(vm=dc1.config.instanceUuid), direction="out")]
    bindings = driver.plan([TapSession("wide", "gre://192.0.2.33")], flows)
    driver.apply(bindings)

    switches, ports = by_switch(vc)
    assert len(switches) == 2
    for vm, both_ways in ((dc0, True), (dc1, False)):
        switch, port = ports[vm.name]
        made = switches[switch]["vtap:wide"]
        assert list(made.sourcePortReceived.portKey) == [port]
        assert list(made.sourcePortTransmitted.portKey or []) == ([port] if both_ways else [])
    assert driver.observe() == bindings

    driver.remove(bindings)
    switches, _ = by_switch(vc)
    assert all("vtap:wide" not in sessions for sessions in switches.values())


def test_a_monitoring_vm_on_the_other_switch_is_refused(two):
    driver, vc = two
    dc0, dc1 = vc.vms()[0], vc.vms()[2]
    versions = {s.uuid: s.config.configVersion for s in vc.all(vim.DistributedVirtualSwitch)}
    with pytest.raises(ValidationError) as raised:
        driver.plan([TapSession("cross", f"vm:{dc0.config.instanceUuid}")], [TapFlow("a", "cross", Source(vm=dc1.config.instanceUuid))])
    assert "another switch" in str(raised.value)
    assert versions == {s.uuid: s.config.configVersion for s in vc.all(vim.DistributedVirtualSwitch)}
