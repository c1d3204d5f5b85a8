"""The vsphere driver against the live simulator; every outcome is read back through pyVmomi."""

import pytest
from pyVmomi import vim

from vtap_core.errors import NotFound, OperationFailed, Unsupported, ValidationError
from vtap_core.model import Source, TapFlow, TapSession

VSPAN = vim.dvs.VmwareDistributedVirtualSwitch


def realize(driver, session, *flows):
    bindings = driver.plan([session], list(flows))
    driver.apply(bindings)
    return bindings


def flow(session, vm, direction="both", name="f1", nic=None, filter=None):
    return TapFlow(name=name, session=session, source=Source(vm=vm.config.instanceUuid, nic=nic), direction=direction, filter=filter)


def same(a, b):
    """pyVmomi data objects compare by identity; their repr lists every field."""
    return repr(a) == repr(b)


def ports(vspan_ports, field="portKey"):
    return sorted(getattr(vspan_ports, field) or []) if vspan_ports is not None else []


def test_inventory_matches_vcenter(driver, vc):
    listed = {vm.uuid: vm for vm in driver.inventory()}
    for vm in vc.vms():
        mine = listed[vm.config.instanceUuid]
        assert mine.name == vm.name
        assert mine.host == vm.runtime.host._moId
        assert mine.details["bios_uuid"] == vm.config.uuid
        assert mine.state == "running"
        nic = vc.nic(vm)
        assert [(n.mac, n.device, n.network, n.details["switch"]) for n in mine.nics] == [
            (nic.macAddress, nic.backing.port.portKey, nic.backing.port.portgroupKey, vc.switch.uuid)
        ]


def test_bios_uuid_and_name_find_the_same_vm(driver, vc):
    vm = vc.vm(0)
    by_bios = driver.plan([TapSession("s", "gre://192.0.2.1")], [TapFlow("f", "s", Source(vm=vm.config.uuid))])
    by_name = driver.plan([TapSession("s", "gre://192.0.2.1")], [TapFlow("f", "s", Source(vm=vm.name))])
    assert by_bios == by_name
    assert by_bios[0].get("received") == (vc.port_key(vm),)


@pytest.mark.parametrize(
    "target, expected",
    [
        ("vm", {"sessionType": "dvPortMirror"}),
        ("port:dvUplink1", {"sessionType": "remoteMirrorSource", "uplinkPortName": ["dvUplink1"]}),
        ("gre://192.0.2.10", {"sessionType": "encapsulatedRemoteMirrorSource", "encapType": "gre", "ipAddress": ["192.0.2.10"]}),
        ("erspan://192.0.2.11?version=2&id=5", {"sessionType": "encapsulatedRemoteMirrorSource", "encapType": "erspan2", "erspanId": 5, "ipAddress": ["192.0.2.11"]}),
        ("erspan://192.0.2.12?version=3&id=1023", {"sessionType": "encapsulatedRemoteMirrorSource", "encapType": "erspan3", "erspanId": 1023, "ipAddress": ["192.0.2.12"]}),
    ],
)
def test_each_session_type_reads_back_field_by_field(driver, vc, target, expected):
    source, monitor = vc.vm(0), vc.vm(5)
    if target == "vm":
        target = f"vm:{monitor.config.instanceUuid}"
        expected = dict(expected, portKey=[vc.port_key(monitor)])
    realize(driver, TapSession("web", target, snaplen=128, sample=4), flow("web", source, "both"))

    made = vc.sessions()["vtap:web"]
    assert made.key
    assert made.enabled is True
    assert made.sessionType == expected["sessionType"]
    assert ports(made.sourcePortTransmitted) == [vc.port_key(source)]
    assert ports(made.sourcePortReceived) == [vc.port_key(source)]
    assert ports(made.destinationPort) == expected.get("portKey", [])
    assert ports(made.destinationPort, "uplinkPortName") == expected.get("uplinkPortName", [])
    assert ports(made.destinationPort, "ipAddress") == expected.get("ipAddress", [])
    assert made.mirroredPacketLength == 128
    assert made.samplingRate == 4
    assert made.encapType == expected.get("encapType")
    assert (made.erspanId or None) == expected.get("erspanId")
    assert made.normalTrafficAllowed is False
    assert made.stripOriginalVlan is False


def test_port_target_by_port_key(driver, vc):
    free = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(connected=True, uplinkPort=False))[-1].key
    realize(driver, TapSession("bykey", f"port:{free}"), flow("bykey", vc.vm(0)))
    made = vc.sessions()["vtap:bykey"]
    assert made.sessionType == "dvPortMirror"
    assert ports(made.destinationPort) == [free]


def test_direction_is_the_vms_point_of_view(driver, vc):
    """out = sent by the VM = what its port receives; in = received by the VM = what its port transmits."""
    out_vm, in_vm = vc.vm(0), vc.vm(1)
    realize(driver, TapSession("dir", "gre://192.0.2.20"), flow("dir", out_vm, "out", "a"), flow("dir", in_vm, "in", "b"))
    made = vc.sessions()["vtap:dir"]
    assert ports(made.sourcePortReceived) == [vc.port_key(out_vm)]
    assert ports(made.sourcePortTransmitted) == [vc.port_key(in_vm)]


def test_reapply_changes_nothing(driver, vc):
    session = TapSession("again", "gre://192.0.2.30")
    bindings = realize(driver, session, flow("again", vc.vm(0)))
    version, made = vc.version(), vc.sessions()
    for _ in range(3):
        driver.apply(driver.plan([session], [flow("again", vc.vm(0))]))
    assert vc.version() == version  # no ReconfigureDvs_Task at all
    assert vc.sessions().keys() == made.keys()
    assert driver.observe() == bindings


def test_delete_removes_exactly_its_session(driver, vc):
    keep = realize(driver, TapSession("keep", "gre://192.0.2.40"), flow("keep", vc.vm(0)))
    gone = realize(driver, TapSession("gone", "gre://192.0.2.41"), flow("gone", vc.vm(1)))
    before = vc.sessions()
    driver.remove(gone)
    after = vc.sessions()
    assert "vtap:gone" not in after
    assert same(after["vtap:keep"], before["vtap:keep"])
    assert driver.observe() == keep
    driver.remove(gone)  # removing what is gone is not an error


def test_hand_made_session_is_never_touched(driver, vc):
    source, monitor = vc.vm(2), vc.vm(3)
    hand = VSPAN.VspanSession(
        name="ops-capture",
        enabled=True,
        sessionType="dvPortMirror",
        sourcePortReceived=VSPAN.VspanPorts(portKey=[vc.port_key(source)]),
        destinationPort=VSPAN.VspanPorts(portKey=[vc.port_key(monitor)]),
    )
    vc.reconfigure_vspan("add", hand)
    original = vc.sessions()["ops-capture"]
    try:
        bindings = realize(driver, TapSession("mine", "gre://192.0.2.50"), flow("mine", vc.vm(0)))
        assert {b.session for b in driver.observe()} == {"mine"}
        driver.remove(driver.observe())
        driver.remove(bindings)
        assert list(vc.sessions()) == ["ops-capture"] and same(vc.sessions()["ops-capture"], original)
    finally:
        vc.reconfigure_vspan("remove", VSPAN.VspanSession(key=original.key))


def test_config_version_conflict_is_reread_and_retried(driver, vc):
    """Someone else reconfigures the switch between vtap's read and its write."""
    bindings = driver.plan([TapSession("race", "gre://192.0.2.60")], [flow("race", vc.vm(0))])
    attempts = []

    def upserts_racing_someone(switch, group):
        if not attempts:
            other = VSPAN.VspanSession(name="someone-else", enabled=True, sessionType="encapsulatedRemoteMirrorSource",
                                       destinationPort=VSPAN.VspanPorts(ipAddress=["192.0.2.61"]))
            vc.reconfigure_vspan("add", other)  # bumps configVersion under vtap's feet
        attempts.append(switch.version)
        return driver._upserts(switch, group)

    try:
        driver.connection.call(lambda content: driver._reconfigure(content, vc.switch.uuid, bindings, upserts_racing_someone))
        assert len(attempts) == 2 and attempts[0] != attempts[1]
        assert driver.observe() == bindings
    finally:
        vc.reconfigure_vspan("remove", VSPAN.VspanSession(key=vc.sessions()["someone-else"].key))


def test_promiscuous_source_port_is_refused_and_left_alone(driver, vc):
    vm = vc.vm(4)
    port = vc.port_key(vm)
    vc.set_promiscuous(port, True)
    try:
        version = vc.version()
        with pytest.raises(ValidationError) as error:
            driver.plan([TapSession("promisc", "gre://192.0.2.70")], [flow("promisc", vm)])
        assert f"port {port}" in str(error.value) and "promiscuous" in str(error.value)
        assert vc.version() == version
        setting = vc.switch.FetchDVPorts(vim.dvs.PortCriteria(portKey=[port]))[0].config.setting
        assert setting.securityPolicy.allowPromiscuous.value is True  # vtap never changes it
    finally:
        vc.set_promiscuous(port, False)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda vc: (TapSession("bad", "gre://192.0.2.80"), [flow("bad", vc.vm(0), filter="tcp port 80")]), Unsupported, "whole ports"),
        (lambda vc: (TapSession("bad", "gre://192.0.2.80"), [TapFlow("f", "bad", Source(vm="4b1d0000-0000-4000-8000-000000000000"))]), NotFound, "no VM"),
        (lambda vc: (TapSession("bad", "gre://192.0.2.80", snaplen=59), [flow("bad", vc.vm(0))]), ValidationError, "snaplen"),
        (lambda vc: (TapSession("bad", "gre://collector.example"), [flow("bad", vc.vm(0))]), ValidationError, "IP address"),
        (lambda vc: (TapSession("bad", "gre://192.0.2.80?key=5"), [flow("bad", vc.vm(0))]), Unsupported, "gre key"),
        (lambda vc: (TapSession("bad", "vxlan://192.0.2.80?vni=5"), [flow("bad", vc.vm(0))]), Unsupported, "vxlan"),
        (lambda vc: (TapSession("bad", f"vm:{vc.vm(0).config.instanceUuid}"), [flow("bad", vc.vm(0))]), ValidationError, "also a source"),
        (lambda vc: (TapSession("bad", "port:no-such-port"), [flow("bad", vc.vm(0))]), NotFound, "no-such-port"),
        (lambda vc: (TapSession("bad", f"port:{vc.port_key(vc.vm(0))}"), [flow("bad", vc.vm(0))]), ValidationError, "also a source"),
    ],
)
def test_bad_input_is_one_clear_line_and_changes_nothing(driver, vc, make, error, words):
    session, flows = make(vc)
    version = vc.version()
    with pytest.raises(error) as raised:
        driver.check_features(session, flows)
        driver.plan([session], flows)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert raised.value.exit_code == 2
    assert vc.version() == version and "vtap:bad" not in vc.sessions()


def test_erspan_id_out_of_range_is_refused_by_the_model():
    with pytest.raises(ValidationError) as raised:
        TapSession("bad", "erspan://192.0.2.1?version=2&id=1024")
    assert "1024" in str(raised.value)


def test_wrong_password_is_a_clear_failure(vcsim, tmp_path):
    from vtap_drivers.vsphere.driver import VsphereDriver

    drv = VsphereDriver(url=vcsim.url, user=vcsim.user, password="wrong", state_dir=str(tmp_path))
    with pytest.raises(OperationFailed) as raised:
        drv.inventory()
    assert "login" in str(raised.value) and "wrong" not in str(raised.value).replace("wrong user", "")


def test_lost_session_is_re_established(driver, vc):
    driver.inventory()
    before = driver.connection.connects
    driver.connection.si.content.sessionManager.Logout()  # vCenter drops vtap's session
    assert len(driver.inventory()) == len(vc.vms())
    assert driver.connection.connects == before + 1


def test_vm_list_follows_a_migration(driver, vc):
    vm = vc.vm(3)
    driver.inventory()  # cached details must not hide the move
    destination = next(h for h in vc.hosts() if h != vm.runtime.host)
    vc.wait(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=destination)))
    listed = {v.uuid: v for v in driver.inventory()}
    assert listed[vm.config.instanceUuid].host == destination._moId


@pytest.mark.parametrize(
    "settings, field",
    [({"url": None, "user": "u"}, "url"), ({"url": "ftp://vc/sdk", "user": "u"}, "url"), ({"url": "https://u:p@vc/sdk", "user": "u"}, "url"), ({"url": "https://vc/sdk", "user": None}, "user")],
)
def test_missing_or_bad_connection_settings_are_usage_errors(tmp_path, settings, field):
    from vtap_drivers.vsphere.driver import VsphereDriver

    driver = VsphereDriver(password="secret", state_dir=str(tmp_path), **settings)  # loading never fails
    with pytest.raises(ValidationError) as raised:
        driver.inventory()
    assert str(raised.value).startswith(f"{field}:") and "secret" not in str(raised.value)
