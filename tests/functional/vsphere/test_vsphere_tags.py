"""vSphere tags through the vAPI tagging service (the simulator's /rest endpoints): `vm list` shows a
VM's tags as `category:tag` and `tag`, a VM tagged while the follower runs is tapped by a `tag=`
selector flow and untapped when the tag is detached; without the service, custom attributes are
the tags and `vm list` says so."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from selector_follow import connect, following, mirrored_ports, wait_for
from vapi_tags import VapiTags
from vcsim_simulator import Simulator, module_simulator
from vtap_core.errors import OperationFailed

VENV_BIN = Path(__file__).resolve().parents[3] / ".venv" / "bin"


@pytest.fixture(scope="module")
def vcsim():
    yield from module_simulator(hosts=3, vms=6)


@pytest.fixture(scope="module")
def tags(vcsim):
    return VapiTags(vcsim)


def vm_list(vcsim, tmp_path, *extra):
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", VTAP_VSPHERE_PASSWORD=vcsim.password)
    command = ["vtap", "--driver", "vsphere", "--url", vcsim.url, "--user", vcsim.user, "--state", str(tmp_path / "s.db"), "vm", "list", "-o", "json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert vcsim.password not in done.stdout + done.stderr
    return {vm["name"]: vm for vm in json.loads(done.stdout)}


def test_vm_list_shows_vsphere_tags(vc, vcsim, tags, tmp_path):
    tier = tags.category("tier")
    web = tags.tag(tier, "web")
    tags.attach(web, vc.vm(1))
    try:
        listed = vm_list(vcsim, tmp_path)
        assert listed[vc.vm(1).name]["tags"] == ["tier:web", "web"]
        assert "tags" not in listed[vc.vm(2).name]
        assert {vm["tags_from"] for vm in listed.values()} == {"vapi"}
    finally:
        tags.detach(web, vc.vm(1))


def test_follower_taps_a_vm_tagged_through_the_vapi_and_untaps_it(vc, vcsim, tags, tmp_path, monkeypatch):
    from vtap_drivers.vsphere import driver as vsphere_driver

    monkeypatch.setattr(vsphere_driver, "TAG_POLL", 1.0)  # the product polls every 10 s; the test need not wait that long
    gold = tags.tag(tags.category("level"), "gold")
    state = str(tmp_path / "s.db")
    with connect(vcsim, state) as client:
        client.create_session("gold", to="gre://192.0.2.45")
        client.add_flow("gold", select="tag=level:gold")
    assert mirrored_ports(vc, "gold") == set()
    vm = vc.vm(3)
    try:
        with following(vcsim, state):  # no periodic resync: only the tag poll can see it
            tags.attach(gold, vm)
            assert wait_for(lambda: mirrored_ports(vc, "gold") == {vc.port_key(vm)}, 30), "the tagged VM was not tapped"
            tags.detach(gold, vm)
            assert wait_for(lambda: mirrored_ports(vc, "gold") == set(), 30), "the untagged VM stayed tapped"
    finally:
        with connect(vcsim, state) as client:
            client.delete_session("gold")


def test_without_the_tagging_service_custom_attributes_are_the_tags(tmp_path):
    with Simulator(hosts=1, vms=2, vapi=False) as sim:
        from pyVmomi import vim

        si = sim.connect()
        manager = si.content.customFieldsManager
        manager.AddCustomFieldDef(name="tags", moType=vim.VirtualMachine)
        vm = sorted(si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True).view, key=lambda v: v.name)[0]
        vm.setCustomValue(key="tags", value="pci")
        listed = vm_list(sim, tmp_path)
        assert listed[vm.name]["tags"] == ["pci"]
        assert {v["tags_from"] for v in listed.values()} == {"custom-attributes"}


def test_tagging_service_certificate_is_verified(tmp_path):
    from vtap_drivers.vsphere.tagging import Tagging

    with Simulator(hosts=1, vms=1, tls=True) as sim:
        with pytest.raises(OperationFailed) as raised:
            Tagging(sim.url, sim.user, sim.password).attachments()
        assert "certificate" in str(raised.value) and sim.password not in str(raised.value)
        assert Tagging(sim.url, sim.user, sim.password, insecure=True).attachments() == {}


def test_a_tag_change_first_read_by_another_vms_plan_still_taps_its_vm(vc, vcsim, tags, tmp_path, monkeypatch):
    """A plan scoped to one VM reads every VM's tags but applies only that VM's: the tag poll must
    still report the other VM's change."""
    from vtap_drivers.vsphere import driver as vsphere_driver

    monkeypatch.setattr(vsphere_driver, "TAG_POLL", 4.0)
    silver = tags.tag(tags.category("grade"), "silver")
    state = str(tmp_path / "s.db")
    with connect(vcsim, state) as client:
        client.create_session("silver", to="gre://192.0.2.46")
        client.add_flow("silver", select="tag=silver")
    other, tagged = vc.vm(4), vc.vm(5)
    name = other.name
    try:
        with following(vcsim, state):
            tags.attach(silver, tagged)
            vc.wait(other.Rename_Task(name + "-renamed"))  # the watch's hint: a plan for `other` alone
            assert wait_for(lambda: mirrored_ports(vc, "silver") == {vc.port_key(tagged)}, 15), "the tagged VM was not tapped"
            tags.detach(silver, tagged)
            assert wait_for(lambda: mirrored_ports(vc, "silver") == set(), 15)
    finally:
        vc.wait(other.Rename_Task(name))
        with connect(vcsim, state) as client:
            client.delete_session("silver")


def test_a_vcenter_gone_mid_way_is_a_temporary_error_without_secrets():
    import signal

    from vtap_core.errors import TemporaryError
    from vtap_drivers.vsphere.tagging import Tagging

    with Simulator(hosts=1, vms=1) as sim:
        tagging = Tagging(sim.url, sim.user, sim.password)
        assert tagging.attachments() == {}
        os.killpg(sim.process.pid, signal.SIGKILL)  # vCenter dies between two reads
        sim.process.wait()
        with pytest.raises(TemporaryError) as raised:
            tagging.attachments()
        assert "unreachable" in str(raised.value) and sim.password not in str(raised.value)
