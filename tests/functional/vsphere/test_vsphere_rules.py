"""What vSphere itself forbids or silently breaks, refused or reported by the driver.

Every outcome is read back from the simulator through pyVmomi: host locality of dvPortMirror
sessions, the samplingRate range, ephemeral ports, uplink destinations, promiscuous ports,
sessions that share vtap's name, and a user without the DVSwitch.Vspan privilege.
"""

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from pyVmomi import vim

from vcenter import Vcenter
from vcsim_simulator import Simulator, available
from vtap_core.client import Client
from vtap_core.errors import OperationFailed, ValidationError
from vtap_core.model import Source, TapFlow, TapSession

VSPAN = vim.dvs.VmwareDistributedVirtualSwitch


def flow(session, vm, direction="both", name="f1"):
    return TapFlow(name=name, session=session, source=Source(vm=vm.config.instanceUuid), direction=direction)


def monitor(vm):
    return f"vm:{vm.config.instanceUuid}"


@contextmanager
def moved(vc, vm, host):
    """vMotion the VM to host, and back to where it was afterwards."""
    home = vm.runtime.host
    vc.wait(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=host)))
    try:
        yield
    finally:
        vc.wait(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=home)))


def test_vm_target_on_another_host_is_refused_and_same_host_is_mirrored(driver, vc):
    source, target = vc.vm(2), vc.vm(5)
    assert source.runtime.host == target.runtime.host
    session = TapSession("local", monitor(target))
    driver.apply(driver.plan([session], [flow("local", source)]))
    assert list(vc.sessions()["vtap:local"].sourcePortReceived.portKey) == [vc.port_key(source)]
    driver.remove(driver.observe())

    version = vc.version()
    with moved(vc, source, vc.hosts()[1]):
        with pytest.raises(ValidationError) as error:
            driver.plan([TapSession("far", monitor(target))], [flow("far", source)])
        text = str(error.value)
        assert "one ESXi host" in text and vc.hosts()[1].name in text and vc.hosts()[0].name in text
        assert "\n" not in text
    assert vc.version() == version and "vtap:far" not in vc.sessions()


def test_port_key_target_on_another_host_is_refused(driver, vc):
    source, target = vc.vm(3), vc.vm(4)
    with moved(vc, target, vc.hosts()[2]):
        with pytest.raises(ValidationError, match="one ESXi host"):
            driver.plan([TapSession("byport", f"port:{vc.port_key(target)}")], [flow("byport", source)])


def test_encapsulated_targets_do_not_depend_on_hosts(driver, vc):
    source = vc.vm(2)
    with moved(vc, source, vc.hosts()[1]):
        driver.apply(driver.plan([TapSession("gre", "gre://192.0.2.40")], [flow("gre", source)]))
        assert list(vc.sessions()["vtap:gre"].sourcePortReceived.portKey) == [vc.port_key(source)]


def test_sample_above_the_apis_range_is_refused_and_the_top_of_it_is_kept(driver, vc):
    source, version = vc.vm(0), vc.version()
    with pytest.raises(ValidationError, match="samplingRate takes 1 to 65535"):
        driver.plan([TapSession("rare", "gre://192.0.2.41", sample=65536)], [flow("rare", source)])
    assert vc.version() == version and "vtap:rare" not in vc.sessions()
    driver.apply(driver.plan([TapSession("rare", "gre://192.0.2.41", sample=65535)], [flow("rare", source)]))
    assert vc.sessions()["vtap:rare"].samplingRate == 65535


def set_portgroup_type(vc, portgroup, kind):
    config = portgroup.config
    spec = vim.dvs.DistributedVirtualPortgroup.ConfigSpec(
        configVersion=config.configVersion, name=config.name, type=kind, numPorts=config.numPorts,
        defaultPortConfig=config.defaultPortConfig, autoExpand=config.autoExpand, description=config.description,
    )
    vc.wait(portgroup.ReconfigureDVPortgroup_Task(spec))
    assert portgroup.config.type == kind


def test_ports_of_an_ephemeral_portgroup_are_refused(driver, vc):
    vm, home = vc.vm(3), vc.portgroup("DC0_DVPG0")
    ephemeral = vc.portgroup("DC0_DVPG1")
    set_portgroup_type(vc, ephemeral, "ephemeral")
    vc.move_nic(vm, ephemeral)
    try:
        version = vc.version()
        with pytest.raises(ValidationError, match="ephemeral portgroup DC0_DVPG1"):
            driver.plan([TapSession("eph", "gre://192.0.2.42")], [flow("eph", vm)])
        with pytest.raises(ValidationError, match="ephemeral portgroup DC0_DVPG1"):
            driver.plan([TapSession("eph", monitor(vm))], [flow("eph", vc.vm(0))])
        assert vc.version() == version and "vtap:eph" not in vc.sessions()
    finally:
        vc.move_nic(vm, home)
        set_portgroup_type(vc, ephemeral, "earlyBinding")


def test_uplink_name_is_a_remote_mirror_source_and_an_uplink_port_key_is_refused(driver, vc):
    source = vc.vm(1)
    driver.apply(driver.plan([TapSession("up", "port:dvUplink1")], [flow("up", source)]))
    made = vc.sessions()["vtap:up"]
    assert made.sessionType == "remoteMirrorSource" and list(made.destinationPort.uplinkPortName) == ["dvUplink1"]
    assert not made.destinationPort.portKey
    uplink = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(uplinkPort=True))[0]
    with pytest.raises(ValidationError, match="use port:dvUplink1"):
        driver.plan([TapSession("upkey", f"port:{uplink.key}")], [flow("upkey", source)])


def test_promiscuous_port_may_be_a_received_only_source(driver, vc):
    vm = vc.vm(4)
    port = vc.port_key(vm)
    vc.set_promiscuous(port, True)
    try:
        # out = sent by the VM = received by its port: the API allows a promiscuous port there.
        driver.apply(driver.plan([TapSession("sniffer", "gre://192.0.2.43")], [flow("sniffer", vm, "out")]))
        made = vc.sessions()["vtap:sniffer"]
        assert list(made.sourcePortReceived.portKey) == [port] and not made.sourcePortTransmitted.portKey
        with pytest.raises(ValidationError, match=f"port {port}"):
            driver.plan([TapSession("sniffer", "gre://192.0.2.43")], [flow("sniffer", vm, "in")])
        driver.remove(driver.observe())
    finally:
        vc.set_promiscuous(port, False)


def test_a_hand_made_session_named_like_vtaps_is_never_acted_on(driver, vc):
    theirs = VSPAN.VspanSession(
        name="vtap:twin", description="made by hand", enabled=True, sessionType="dvPortMirror",
        sourcePortReceived=VSPAN.VspanPorts(portKey=[vc.port_key(vc.vm(2))]),
        destinationPort=VSPAN.VspanPorts(portKey=[vc.port_key(vc.vm(3))]),
    )
    vc.reconfigure_vspan("add", theirs)
    (before,) = [s for s in vc.switch.config.vspanSession if s.name == "vtap:twin"]
    try:
        assert driver.observe() == []
        driver.apply(driver.plan([TapSession("twin", "gre://192.0.2.44")], [flow("twin", vc.vm(0))]))
        twins = {s.key: s for s in vc.switch.config.vspanSession if s.name == "vtap:twin"}
        assert len(twins) == 2
        assert repr(twins.pop(before.key)) == repr(before)  # theirs, field by field
        (mine,) = twins.values()
        assert mine.sessionType == "encapsulatedRemoteMirrorSource"
        assert list(mine.sourcePortReceived.portKey) == [vc.port_key(vc.vm(0))]
        driver.remove(driver.observe())
        (left,) = [s for s in vc.switch.config.vspanSession if s.name == "vtap:twin"]
        assert repr(left) == repr(before)
    finally:
        vc.reconfigure_vspan("remove", VSPAN.VspanSession(key=before.key))


@pytest.fixture(scope="module")
def denied():
    """A simulator whose user lacks DVSwitch.Vspan (every vspan change raises NoPermission)."""
    if available():
        pytest.skip(available())
    with Simulator(hosts=1, vms=2, deny_vspan=True) as sim:
        yield sim


def test_missing_vspan_privilege_is_one_line_naming_it(denied, tmp_path):
    vc = Vcenter(denied.connect())
    state = str(tmp_path / "vtap.db")
    with Client(driver="vsphere", state=state, url=denied.url, user=denied.user, password=denied.password) as client:
        client.create_session("nope", to="gre://192.0.2.45")
        with pytest.raises(OperationFailed) as error:
            client.add_flow("nope", vm=vc.vm(0).config.instanceUuid)
        text = str(error.value)
        assert "DVSwitch.Vspan" in text and denied.user in text and "\n" not in text
        assert client.store.flows() == []
    assert not vc.sessions()

    (tmp_path / "empty.toml").write_text("")
    env = dict(os.environ, VTAP_VSPHERE_PASSWORD=denied.password, VTAP_STATE=state, VTAP_CONFIG=str(tmp_path / "empty.toml"))
    command = [sys.executable, "-m", "vtap_cli.main", "--driver", "vsphere", "--url", denied.url, "--user", denied.user, "--insecure"]
    done = subprocess.run([*command, "flow", "add", "nope", "--vm", vc.vm(1).name], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "privilege DVSwitch.Vspan" in done.stderr
    assert denied.password not in done.stdout + done.stderr
    assert not vc.sessions()


def test_vm_target_takes_encap_erspan_and_nothing_else():
    from vtap_core.model import Target

    uuid = "4210a1b2-0000-4000-8000-000000000001"
    allowed = Target.parse(f"vm:{uuid}#00:50:56:00:00:01?encap=erspan")
    assert (allowed.vm, allowed.mac, allowed.encap) == (uuid, "00:50:56:00:00:01", "erspan")
    assert Target.parse(str(allowed)) == allowed and Target.parse(f"vm:{uuid}").encap is None
    for bad in (f"vm:{uuid}?encap=gre", f"vm:{uuid}?encap=erspan&id=3", f"vm:{uuid}?"):
        with pytest.raises(ValidationError, match="encap=erspan"):
            Target.parse(bad)


def test_vm_target_with_encap_on_another_host_plans_erspan_to_its_guest_ip(driver, vc):
    source, target = vc.vm(0), vc.vm(5)
    with moved(vc, source, vc.hosts()[1]):
        bindings = driver.plan([TapSession("enc", f"vm:{target.config.instanceUuid}?encap=erspan")], [flow("enc", source)])
        assert bindings[0].get("type") == "encapsulatedRemoteMirrorSource"
        (address,) = bindings[0].get("destination_ips")
        assert address in [a for n in target.guest.net for a in n.ipAddress]


def test_an_ephemeral_nic_that_is_not_mirrored_does_not_matter(driver, vc):
    """Only the NICs a flow or target uses are checked: another NIC's portgroup is not the flow's business."""
    vm = vc.vm(3)
    ephemeral = vc.portgroup("DC0_DVPG1")
    set_portgroup_type(vc, ephemeral, "ephemeral")
    vc.move_nic(vm, ephemeral)
    try:
        # vm(0)'s NIC is not on the ephemeral portgroup; vm(3) is neither source nor target here.
        driver.apply(driver.plan([TapSession("fine", "gre://192.0.2.46")], [flow("fine", vc.vm(0))]))
        assert list(vc.sessions()["vtap:fine"].sourcePortReceived.portKey) == [vc.port_key(vc.vm(0))]
    finally:
        vc.move_nic(vm, vc.portgroup("DC0_DVPG0"))
        set_portgroup_type(vc, ephemeral, "earlyBinding")
