"""A VM deleted from vCenter takes its own flow with it, not the rest of its session."""

import pytest
from pyVmomi import vim

from vcenter import Vcenter
from vcsim_simulator import module_simulator
from vtap_core.client import Client


@pytest.fixture(scope="module")
def vcsim():
    yield from module_simulator(hosts=2, vms=3)


def test_deleted_vm_leaves_the_other_flows_mirrored(vcsim, tmp_path):
    vc = Vcenter(vcsim.connect())
    keep, doomed = vc.vm(0), vc.vm(1)
    keep_port = vc.port_key(keep)
    with Client(driver="vsphere", state=str(tmp_path / "vtap.db"), url=vcsim.url, user=vcsim.user, password=vcsim.password) as client:
        client.create_session("pair", to="gre://192.0.2.44")
        client.add_flow("pair", vm=keep.config.instanceUuid, name="keep")
        client.add_flow("pair", vm=doomed.config.instanceUuid, name="doomed")
        assert sorted(vc.sessions()["vtap:pair"].sourcePortReceived.portKey) == sorted([keep_port, vc.port_key(doomed)])
        key = vc.sessions()["vtap:pair"].key

        vc.wait(doomed.PowerOffVM_Task())
        vc.wait(doomed.Destroy_Task())
        plan = client.reconcile()

        made = vc.sessions()["vtap:pair"]
        assert made.key == key  # edited in place, not rebuilt
        assert list(made.sourcePortReceived.portKey) == [keep_port]
        assert [p[1] for p in plan.problems] == ["doomed"]
        rows = {row.flow: row for row in client.status()}
        assert rows["keep"].state == "active"
        assert rows["doomed"].state != "active" and "no VM" in rows["doomed"].problem
        client.delete_session("pair")
        assert "vtap:pair" not in vc.sessions()
