"""The extended simulator behaves as the vSphere API reference says (read through pyVmomi).

These are the behaviours the vsphere driver's tests rely on; each one is cited in the Go code.
"""

import pytest

from vcsim_simulator import Simulator, available, module_simulator

pytest.importorskip("pyVmomi", reason="pyvmomi missing: run scripts/setup --test")
from pyVmomi import vim, vmodl  # noqa: E402
from vcenter import VSPAN, Vcenter  # noqa: E402



@pytest.fixture(scope="module")
def vc():
    for sim in module_simulator(hosts=3, vms=4):
        yield Vcenter(sim.connect())


def mirror(name, source, destination, kind="dvPortMirror"):
    return VSPAN.VspanSession(
        name=name, enabled=True, sessionType=kind,
        sourcePortReceived=VSPAN.VspanPorts(portKey=[source]),
        destinationPort=VSPAN.VspanPorts(portKey=[destination]),
    )


def test_nics_have_their_own_ports_and_macs(vc):
    vms = vc.vms()
    ports = [vc.port_key(vm) for vm in vms]
    assert all(ports) and len(set(ports)) == len(vms)
    macs = {next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)).macAddress for vm in vms}
    assert len(macs) == len(vms)


def test_switch_reports_vspan_capability_and_uplinks(vc):
    assert isinstance(vc.switch, VSPAN)  # a VmwareDistributedVirtualSwitch, as in vCenter
    features = vc.switch.capability.featuresSupported
    assert features.vspanSupported and features.vspanCapability.dvportSupported
    assert features.vspanCapability.encapRemoteSourceSupported and features.vspanCapability.erspanProtocolSupported
    assert list(vc.switch.config.uplinkPortPolicy.uplinkPortName) == ["dvUplink1"]


def test_fetch_dv_ports_honours_its_criteria(vc):
    vms = vc.vms()
    everything = vc.switch.FetchDVPorts(vim.dvs.PortCriteria())
    uplinks = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(uplinkPort=True))
    assert len(uplinks) == 3 and all(p.connectee.type == "pnic" for p in uplinks)
    (one,) = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portKey=[vc.port_key(vms[0])]))
    assert one.connectee.connectedEntity == vms[0] and one.proxyHost == vms[0].runtime.host
    on_host = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(host=[vms[0].runtime.host], uplinkPort=False))
    assert vc.port_key(vms[0]) in [p.key for p in on_host]
    assert all(p.proxyHost == vms[0].runtime.host for p in on_host)
    key = next(p.portgroupKey for p in everything if p.key == vc.port_key(vms[0]))
    assert {p.key for p in vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portgroupKey=[key], inside=False))} == {p.key for p in everything} - {
        p.key for p in vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portgroupKey=[key]))
    }


def test_vspan_add_edit_remove_with_keys_and_config_versions(vc):
    a, b, c = (vc.port_key(vm) for vm in vc.vms()[:3])
    start = int(vc.switch.config.configVersion)
    vc.vspan(("add", mirror("one", a, b)))
    made = vc.sessions()["one"]
    assert made.key and int(vc.switch.config.configVersion) == start + 1
    made.mirroredPacketLength = 100
    vc.vspan(("edit", made))
    assert vc.sessions()["one"].mirroredPacketLength == 100 and vc.sessions()["one"].key == made.key
    vc.vspan(("remove", VSPAN.VspanSession(key=made.key)))
    assert "one" not in vc.sessions() and int(vc.switch.config.configVersion) == start + 3


def no_ip(a, b, c):
    return [VSPAN.VspanSession(name="noip", enabled=True, sessionType="encapsulatedRemoteMirrorSource",
                               sourcePortReceived=VSPAN.VspanPorts(portKey=[a]))]


def transmitted_source_elsewhere_destination(a, b, c):
    first = mirror("tx", a, b)
    first.sourcePortTransmitted, first.sourcePortReceived = first.sourcePortReceived, None
    return [first, mirror("rx", c, a)]


def too_short(a, b, c):
    session = mirror("short", a, b)
    session.mirroredPacketLength = 59
    return [session]


def sampled_too_rarely(a, b, c):
    session = mirror("rare", a, b)
    session.samplingRate = 65536  # samplingRate: "Valid values are between 1 to 65535"
    return [session]


def uplink_by_port_key_outside_mixed_dest(a, b, c):
    session = mirror("upkey", a, b, kind="remoteMirrorSource")
    return [session]  # remoteMirrorSource sends to uplink port names, never to port keys


def uplink_name_in_dv_port_mirror(a, b, c):
    session = mirror("upname", a, b)
    session.destinationPort = VSPAN.VspanPorts(uplinkPortName=["dvUplink1"])
    return [session]


@pytest.mark.parametrize(
    "sessions, fault",
    [
        (lambda a, b, c: [mirror("same", a, a)], vim.fault.VspanSameSessionPortConflict),
        (lambda a, b, c: [mirror("d1", a, c), mirror("d2", b, c)], vim.fault.VspanDestPortConflict),
        (transmitted_source_elsewhere_destination, vim.fault.VspanPortConflict),
        (no_ip, vmodl.fault.InvalidArgument),
        (too_short, vmodl.fault.InvalidArgument),
        (sampled_too_rarely, vmodl.fault.InvalidArgument),
        (uplink_by_port_key_outside_mixed_dest, vmodl.fault.InvalidArgument),
        (uplink_name_in_dv_port_mirror, vmodl.fault.InvalidArgument),
    ],
)
def test_vspan_refusals_change_nothing(vc, sessions, fault):
    a, b, c = (vc.port_key(vm) for vm in vc.vms()[:3])
    version, before = vc.switch.config.configVersion, set(vc.sessions())
    with pytest.raises(fault):
        vc.vspan(*[("add", s) for s in sessions(a, b, c)])
    assert vc.switch.config.configVersion == version and set(vc.sessions()) == before


def test_sessions_may_share_a_name_and_are_told_apart_by_key(vc):
    """vCenter identifies a session by its generated key; the name is only a display name."""
    a, b, c = (vc.port_key(vm) for vm in vc.vms()[:3])
    vc.vspan(("add", mirror("twin", a, b)), ("add", mirror("twin", c, a)))
    twins = [s for s in vc.switch.config.vspanSession if s.name == "twin"]
    assert len(twins) == 2 and twins[0].key != twins[1].key
    vc.vspan(*[("remove", VSPAN.VspanSession(key=s.key)) for s in twins])
    assert not [s for s in vc.switch.config.vspanSession if s.name == "twin"]


def test_uplink_names_are_remote_mirror_source_destinations(vc):
    a = vc.port_key(vc.vms()[0])
    session = VSPAN.VspanSession(name="up", enabled=True, sessionType="remoteMirrorSource",
                                 sourcePortReceived=VSPAN.VspanPorts(portKey=[a]),
                                 destinationPort=VSPAN.VspanPorts(uplinkPortName=["dvUplink1"]))
    vc.vspan(("add", session))
    made = vc.sessions()["up"]
    assert made.sessionType == "remoteMirrorSource" and list(made.destinationPort.uplinkPortName) == ["dvUplink1"]
    vc.vspan(("remove", VSPAN.VspanSession(key=made.key)))


def test_vms_start_on_their_clusters_first_host_and_ports_follow_them(vc):
    vms, hosts = vc.vms(), vc.hosts()
    assert {vm.runtime.host for vm in vms} == {hosts[0]}
    assert all(vm in hosts[0].vm for vm in vms)
    (port,) = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portKey=[vc.port_key(vms[1])]))
    assert port.proxyHost == hosts[0]


def test_portgroups_report_their_binding_type(vc):
    assert {pg.config.type for pg in vc.switch.portgroup} == {"earlyBinding"}


def test_vspan_changes_without_the_vspan_privilege_raise_no_permission():
    if available():
        pytest.skip(available())
    with Simulator(hosts=1, vms=2, deny_vspan=True) as sim:
        denied = Vcenter(sim.connect())
        a, b = (denied.port_key(vm) for vm in denied.vms())
        version = denied.version()
        with pytest.raises(vim.fault.NoPermission) as fault:
            denied.vspan(("add", mirror("nope", a, b)))
        assert fault.value.privilegeId == "DVSwitch.Vspan" and fault.value.object == denied.switch
        assert denied.version() == version and not denied.sessions()


def test_stale_config_version_is_concurrent_access(vc):
    a, b, _ = (vc.port_key(vm) for vm in vc.vms()[:3])
    old = vc.switch.config.configVersion
    vc.vspan(("add", mirror("first", a, b)))
    with pytest.raises(vim.fault.ConcurrentAccess):
        vc.vspan(("add", mirror("second", b, a)), version=old)
    vc.vspan(("remove", VSPAN.VspanSession(key=vc.sessions()["first"].key)))


def test_promiscuous_ports_and_mirrors_exclude_each_other(vc):
    a, b, c = (vc.port_key(vm) for vm in vc.vms()[:3])

    def promiscuous(key, allow):
        setting = VSPAN.VmwarePortConfigPolicy(securityPolicy=VSPAN.SecurityPolicy(allowPromiscuous=vim.BoolPolicy(value=allow)))
        vc.wait(vc.switch.ReconfigureDVPort_Task([vim.dvs.DistributedVirtualPort.ConfigSpec(operation="edit", key=key, setting=setting)]))

    def transmitted(name, source, destination):
        session = mirror(name, source, destination)
        session.sourcePortTransmitted, session.sourcePortReceived = session.sourcePortReceived, None
        return session

    promiscuous(a, True)
    with pytest.raises(vim.fault.VspanPromiscuousPortNotSupported):
        vc.vspan(("add", transmitted("p", a, b)))
    with pytest.raises(vim.fault.VspanPromiscuousPortNotSupported):
        vc.vspan(("add", mirror("p", c, a)))  # as a destination
    vc.vspan(("add", mirror("rx", a, c)))  # a received-only source may be promiscuous
    vc.vspan(("remove", VSPAN.VspanSession(key=vc.sessions()["rx"].key)))
    promiscuous(a, False)
    vc.vspan(("add", transmitted("p", a, b)))
    with pytest.raises(vim.fault.VspanPortPromiscChangeFault):
        promiscuous(a, True)
    vc.vspan(("remove", VSPAN.VspanSession(key=vc.sessions()["p"].key)))


def test_relocate_moves_the_vm_and_posts_vm_migrated_event(vc):
    vm = vc.vms()[3]
    source = vm.runtime.host
    destination = next(h for h in vc.all(vim.HostSystem) if h != source)
    port = vc.port_key(vm)
    vc.wait(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=destination)))
    assert vm.runtime.host == destination
    assert vm in destination.vm and vm not in source.vm
    assert vc.port_key(vm) == port  # a move within the switch keeps the port
    events = vc.content.eventManager.QueryEvents(vim.event.EventFilterSpec(eventTypeId=["VmMigratedEvent"]))
    event = [e for e in events if e.vm.vm == vm][-1]
    assert event.sourceHost.host == source and event.host.host == destination
    assert source.name in event.fullFormattedMessage


def test_nic_reconnect_gets_a_new_port_and_bumps_change_version(vc):
    vm = vc.vms()[2]
    nic = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    old_port, old_version = nic.backing.port.portKey, vm.config.changeVersion
    other = next(pg for pg in vc.switch.portgroup if pg.name == "DC0_DVPG1")
    nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
        port=vim.dvs.PortConnection(switchUuid=vc.switch.uuid, portgroupKey=other.key))
    vc.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)])))
    assert vc.port_key(vm) != old_port and vc.port_key(vm) in other.portKeys
    assert vm.config.changeVersion != old_version
    (freed,) = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portKey=[old_port]))
    assert freed.connectee is None


def test_created_and_cloned_vms_get_ports_of_their_own(vc):
    created = vc.create_vm("created-0")
    clone = vc.clone_vm(created, "clone-0")
    try:
        keys = [vc.port_key(vm) for vm in (created, clone)]
        assert all(keys) and len(set(keys) | {vc.port_key(vm) for vm in vc.vms() if vm not in (created, clone)}) == len(vc.vms())
        assert vc.nic(created).macAddress != vc.nic(clone).macAddress
        ports = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portKey=keys))
        assert {p.key: p.connectee.connectedEntity for p in ports} == {keys[0]: created, keys[1]: clone}
        assert {p.proxyHost for p in ports} == {vc.hosts()[0]}  # the cluster's first host, like every VM here
        assert created.network == [vc.portgroup(pg.name) for pg in vc.switch.portgroup if pg.key == vc.nic(created).backing.port.portgroupKey]
    finally:
        for vm in (clone, created):
            vc.wait(vm.Destroy_Task())


def test_create_vm_on_an_unknown_portgroup_is_refused(vc):
    before = [vm.name for vm in vc.vms()]
    with pytest.raises(vim.fault.InvalidDeviceSpec):
        vc.create_vm("nowhere-0", portgroup="dvportgroup-none")
    assert [vm.name for vm in vc.vms()] == before


def test_rename_moves_change_version(vc):
    vm = vc.vm(0)
    name, version = vm.name, vm.config.changeVersion
    vc.wait(vm.Rename_Task("renamed-0"))
    try:
        assert vm.config.name == "renamed-0" and vm.config.changeVersion != version
    finally:
        vc.wait(vm.Rename_Task(name))
