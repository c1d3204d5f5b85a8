"""VMs created and cloned while `vtap follow` runs (the project's simulator binds their NICs to
distributed ports as vCenter does): a VM whose name matches a selector flow is tapped, one that does
not match is not, and a VM renamed out of the selector is untapped."""

import time

from selector_follow import connect, following, mirrored_ports, wait_for


def test_created_and_cloned_vms_are_tapped_while_the_follower_runs(vc, vcsim, tmp_path):
    state = str(tmp_path / "s.db")
    with connect(vcsim, state) as client:
        client.create_session("web", to="gre://192.0.2.44")
        client.add_flow("web", select="name=web-*")
    assert mirrored_ports(vc, "web") == set()
    made = []
    try:
        with following(vcsim, state):
            created = vc.create_vm("web-created")
            made.append(created)
            other = vc.create_vm("db-created")
            made.append(other)
            clone = vc.clone_vm(created, "web-clone")
            made.append(clone)
            keys = {vm.name: vc.port_key(vm) for vm in made}
            assert len(set(keys.values())) == 3 and all(keys.values()), keys  # each NIC on a port of its own
            wanted = {keys["web-created"], keys["web-clone"]}
            assert wait_for(lambda: mirrored_ports(vc, "web") == wanted), (mirrored_ports(vc, "web"), keys)
            time.sleep(1.0)
            assert keys["db-created"] not in mirrored_ports(vc, "web")

            vc.wait(clone.Rename_Task("db-clone"))
            assert wait_for(lambda: mirrored_ports(vc, "web") == {keys["web-created"]}), "the renamed clone stayed tapped"
    finally:
        with connect(vcsim, state) as client:
            client.delete_session("web")
        for vm in made:
            vc.wait(vm.Destroy_Task())
