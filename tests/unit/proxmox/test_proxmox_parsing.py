"""The Proxmox driver's pure parts: PVE's config strings, naming a VM and NIC, settings, the snippet."""

import json

import pytest

from vtap_core.errors import NotFound, ValidationError
from vtap_core.model import Source, TapFlow, TapSession
from vtap_drivers.proxmox import SETTINGS, desired
from vtap_drivers.proxmox.api import parse_url
from vtap_drivers.proxmox.driver import netns_for
from vtap_drivers.proxmox.hook import check_vmid, snippet_text
from vtap_drivers.proxmox.inventory import PveVm, parse_net, parse_smbios_uuid, vm_from
from vtap_drivers.proxmox.resolve import resolve_source

UUID = "6f1e9d0e-1111-4222-8333-944455556666"


def make_vm(vmid=100, name="web", uuid=UUID, nets=("virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1",)):
    config = {f"net{i}": v for i, v in enumerate(nets)}
    if uuid:
        config["smbios1"] = f"uuid={uuid}"
    return vm_from({"vmid": vmid, "name": name, "node": "pve1", "status": "running"}, config)


def test_settings_are_the_documented_environment_variables():
    assert SETTINGS["url"] == "VTAP_PROXMOX_URL"
    assert SETTINGS["token_value"] == "VTAP_PROXMOX_TOKEN_VALUE"
    assert SETTINGS["node"] == "VTAP_PROXMOX_NODE"


def test_net_lines_give_mac_bridge_tag_and_firewall():
    nic = parse_net(1, "e1000=BC:24:11:AA:BB:CC,bridge=vmbr1,firewall=1,tag=20,rate=10")
    assert (nic.mac, nic.model, nic.bridge, nic.tag, nic.firewall) == ("bc:24:11:aa:bb:cc", "e1000", "vmbr1", 20, True)
    assert parse_net(0, "virtio,bridge=vmbr0").mac is None
    assert parse_net(2, "model=virtio,macaddr=BC:24:11:00:00:09").mac == "bc:24:11:00:00:09"


def test_smbios_uuid_is_read_and_canonical():
    assert parse_smbios_uuid(f"manufacturer=QUJD,uuid={UUID.upper()},base64=1") == UUID
    assert parse_smbios_uuid("manufacturer=x") is None
    assert parse_smbios_uuid(None) is None


def test_host_device_is_tap_vmid_i_index():
    vm = make_vm(nets=("virtio=BC:24:11:00:00:01", "virtio=BC:24:11:00:00:02"))
    assert [vm.device(n) for n in vm.nics] == ["tap100i0", "tap100i1"]
    model = vm.to_model()
    assert model.uuid == UUID and model.nics[1].device == "tap100i1" and model.details["vmid"] == 100


def test_vm_without_uuid_is_addressable_by_vmid_and_listed_with_a_warning():
    vm = make_vm(vmid=205, uuid=None)
    assert vm.identity == "205"
    assert "no smbios1 UUID" in vm.to_model().details["warning"]
    found, nics = resolve_source([vm], Source(vm="205"))
    assert found is vm and len(nics) == 1


def test_sources_resolve_by_uuid_name_vmid_mac_and_net_index():
    vms = [make_vm(nets=("virtio=BC:24:11:00:00:01", "virtio=BC:24:11:00:00:02")), make_vm(101, "db", "0b7e0a9c-2222-4333-8444-955566667777")]
    assert resolve_source(vms, Source(vm=UUID))[0].vmid == 100
    assert resolve_source(vms, Source(vm="db"))[0].vmid == 101
    assert [n.index for n in resolve_source(vms, Source(vm="100/net1"))[1]] == [1]
    assert [n.index for n in resolve_source(vms, Source(vm="web", nic="bc:24:11:00:00:02"))[1]] == [1]


def test_unknown_vm_and_missing_nic_are_clear_errors():
    vms = [make_vm()]
    with pytest.raises(NotFound, match="no VM with vmid '999'"):
        resolve_source(vms, Source(vm="999"))
    with pytest.raises(ValidationError, match=r"nic: VM 100 \(web\) has no net3; its NICs: net0"):
        resolve_source(vms, Source(vm="100/net3"))
    with pytest.raises(ValidationError, match="no NIC with MAC"):
        resolve_source(vms, Source(vm="100", nic="bc:24:11:99:99:99"))
    with pytest.raises(ValidationError, match="shared by VMs 100, 102"):
        resolve_source(vms + [make_vm(102, "web", None)], Source(vm="web"))


def test_netns_setting_is_one_name_or_a_node_map():
    assert netns_for(None, "pve1") is None
    assert netns_for("lab", "pve1") == "lab"
    assert netns_for("pve1=ns-a,pve2=ns-b", "pve2") == "ns-b"
    with pytest.raises(ValidationError, match="no namespace for node 'pve3'"):
        netns_for("pve1=ns-a", "pve3")


def test_url_must_be_https():
    assert parse_url("https://pve.example:8006") == ("pve.example", 8006)
    assert parse_url("https://pve.example") == ("pve.example", 8006)
    for bad in ("http://pve.example:8006", "pve.example", "", "https://pve.example/some/path"):
        with pytest.raises(ValidationError, match="^url: "):
            parse_url(bad)


def test_hook_vmid_and_snippet():
    assert check_vmid("100") == 100
    with pytest.raises(ValidationError, match="vmid"):
        check_vmid("99")
    text = snippet_text("/usr/local/bin/vtap", strict=True)
    assert text.startswith("#!/bin/sh\n") and "STRICT=1\n" in text and "|| VTAP=/usr/local/bin/vtap\n" in text
    assert "password" not in snippet_text("/usr/bin/vtap", strict=False).lower().replace("never from this file", "")


def test_desired_state_round_trip_and_last_good_copy(tmp_path):
    shared = tmp_path / "pve" / "vtap" / "desired.json"
    session = TapSession(name="web", target="port:mon0")
    flow = TapFlow(name="web-1", session="web", source=Source(vm=UUID), direction="out")
    desired.publish(str(shared), [session], [flow], "pve1")
    reader = desired.DesiredState(str(shared), str(tmp_path))
    assert reader.load() == ([session], [flow])
    shared.write_text("{ not json")  # a torn or damaged document
    assert reader.load() == ([session], [flow])
    assert reader.failing
    assert json.loads((tmp_path / desired.LAST_GOOD).read_text())["flows"][0]["name"] == "web-1"


def test_unmounted_cluster_fs_is_not_nothing_desired(tmp_path):
    shared = tmp_path / "pve" / "vtap" / "desired.json"
    reader = desired.DesiredState(str(shared), str(tmp_path))
    assert reader.load() == ([], [])  # never published: nothing desired
    desired.publish(str(shared), [TapSession(name="s", target="port:m")], [], "pve1")
    reader.load()
    shared.unlink()
    shared.parent.rmdir()  # pmxcfs not mounted: its folder is gone
    assert [s.name for s in reader.load()[0]] == ["s"]
