"""Selector flows on vSphere (the project's simulator): custom attributes as tags, folders, host and
portgroup names; a VM retagged while the follower runs joins the session, and leaves it when untagged."""

import pytest
from pyVmomi import vim

from selector_follow import connect, following, mirrored_ports, wait_for
from vcsim_simulator import module_simulator
from vtap_core.errors import Unsupported


@pytest.fixture(scope="module")
def vcsim():
    yield from module_simulator(hosts=3, vms=6, vapi=False)  # no tagging service: tags are custom attributes


@pytest.fixture(scope="module")
def tags_field(si):
    manager = si.content.customFieldsManager
    field = next((f for f in manager.field or () if f.name == "tags"), None)
    return field or manager.AddCustomFieldDef(name="tags", moType=vim.VirtualMachine)


def set_tags(si, vm, field, text):
    vm.setCustomValue(key=field.name, value=text)  # what the vSphere client does for a VM's attribute


def test_tags_folders_and_names_select_the_right_ports(vc, si, vcsim, tags_field, tmp_path):
    vm0, vm1, vm2 = vc.vm(0), vc.vm(1), vc.vm(2)
    set_tags(si, vm0, tags_field, "pci,web")
    set_tags(si, vm1, tags_field, "lab")
    datacenter = vc.all(vim.Datacenter)[0]
    dmz = datacenter.vmFolder.CreateFolder("dmz")
    vc.wait(dmz.MoveIntoFolder_Task([vm2]))
    try:
        with connect(vcsim, str(tmp_path / "s.db")) as client:
            listed = {vm.name: vm for vm in client.vms()}
            assert listed[vm0.name].tags == ("pci", "web")
            assert listed[vm2.name].folder == f"/{datacenter.name}/vm/dmz"
            assert listed[vm0.name].facts()["host"] == [vm0.runtime.host._moId, vm0.runtime.host.name]

            client.create_session("pci", to="gre://192.0.2.40")
            client.add_flow("pci", select="tag=pci")
            assert mirrored_ports(vc, "pci") == {vc.port_key(vm0)}
            client.create_session("dmz", to="gre://192.0.2.41")
            client.add_flow("dmz", select=f"folder=/{datacenter.name}/vm/dmz")
            assert mirrored_ports(vc, "dmz") == {vc.port_key(vm2)}
            portgroup = vc.nic(vm1).backing.port.portgroupKey
            name = next(pg.name for pg in vc.switch.portgroup if pg.key == portgroup)
            client.create_session("byname", to="gre://192.0.2.42")
            client.add_flow("byname", select=f"host={vm1.runtime.host.name},network={name},tag!=pci")
            expected = {vc.port_key(vm) for vm in vc.vms() if vm.runtime.host == vm1.runtime.host and vm != vm0}
            assert mirrored_ports(vc, "byname") == expected
            with pytest.raises(Unsupported, match="selector key 'pool'"):
                client.add_flow("pci", select="pool=dmz")
            for name in ("pci", "dmz", "byname"):
                client.delete_session(name)
    finally:
        vc.wait(datacenter.vmFolder.MoveIntoFolder_Task([vm2]))
        set_tags(si, vm0, tags_field, "")
        set_tags(si, vm1, tags_field, "")


def test_follower_taps_a_retagged_vm_and_untaps_it(vc, si, vcsim, tags_field, tmp_path):
    state = str(tmp_path / "s.db")
    with connect(vcsim, state) as client:
        client.create_session("web", to="gre://192.0.2.43")
        client.add_flow("web", select="name=web-*")
        client.add_flow("web", select="tag=gold", name="gold")
    assert mirrored_ports(vc, "web") == set()
    try:
        with following(vcsim, state):
            gold = vc.vm(4)
            set_tags(si, gold, tags_field, "gold")
            assert wait_for(lambda: vc.port_key(gold) in mirrored_ports(vc, "web")), "the retagged VM was not tapped"
            with connect(vcsim, state) as client:
                during = client.status()
            set_tags(si, gold, tags_field, "")
            assert wait_for(lambda: vc.port_key(gold) not in mirrored_ports(vc, "web")), "the untagged VM stayed tapped"
    finally:
        with connect(vcsim, state) as client:
            rows = client.status()
            client.delete_session("web")
    assert {r.flow: [m["name"] for m in r.members] for r in during} == {"web-1": [], "gold": [gold.name]}
    assert all(r.members == [] for r in rows)
