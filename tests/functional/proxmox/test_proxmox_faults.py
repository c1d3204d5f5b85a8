"""fakepve's faults against a running node agent: it retries, logs one line, and converges."""

import logging
import threading

import pytest
from pve_lab import wait_for

from vtap_core.client import Client
from vtap_drivers.proxmox.agent import Agent
from vtap_drivers.proxmox.desired import DesiredState
from vtap_drivers.proxmox.driver import ProxmoxDriver

INTERVAL = 0.2


@pytest.fixture
def running(cluster, nodes, tmp_path, caplog):
    """VM 100 on pve1 with a flow; pve1's agent running in a thread. Yields (pve1 namespace, agent)."""
    caplog.set_level(logging.INFO, logger="vtap.proxmox.agent")
    cluster.add_vm(100, "web", "pve1")
    cluster.add_vm(101, "db", "pve2")
    pve1 = nodes("pve1")
    pve1.add_tap(100)
    pve1.add_tap(101)
    shared = str(tmp_path / "pmxcfs" / "desired.json")
    settings = cluster.settings("pve1", netns=pve1.name, shared_state=shared)
    state_dir = tmp_path / "pve1-state"  # the node's store folder: CLI and agent share its catalog
    with Client(driver="proxmox", state=str(state_dir / "state.db"), **settings) as client:
        client.create_session("web", to="port:mon0")
        client.add_flow("web", vm="web", direction="out")
        client.add_flow("web", vm="db", direction="out")
    driver = ProxmoxDriver(state_dir=str(state_dir), **settings)
    agent = Agent(driver, DesiredState(shared, str(state_dir)), interval=INTERVAL)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield pve1, agent
    finally:
        stop.set()
        thread.join(10)
        driver.close()


def trouble_lines(caplog):
    return [r.getMessage() for r in caplog.records if "cycle failed" in r.getMessage()]


def tapped(ns, vmid):
    return "mirred" in ns.filters(f"tap{vmid}i0")


def test_api_errors_are_retried_with_one_log_line_then_converge(cluster, running, caplog):
    pve1, agent = running
    wait_for(lambda: tapped(pve1, 100))
    cluster.pve.fail("GET", "/cluster/resources", 500, "internal error")
    wait_for(lambda: agent.trouble is not None)
    cluster.migrate(101, "pve1")  # happens while the agent cannot see the cluster
    threading.Event().wait(5 * INTERVAL)  # several failing cycles
    assert not tapped(pve1, 101)
    del cluster.pve.failures[("GET", "/cluster/resources")]
    wait_for(lambda: tapped(pve1, 101))
    lines = trouble_lines(caplog)
    assert len(lines) == 1 and "500 internal error" in lines[0], lines
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert tapped(pve1, 100)  # never taken away during the outage


def test_expired_ticket_is_renewed_without_noise(cluster, running, caplog):
    pve1, agent = running
    wait_for(lambda: tapped(pve1, 100))
    cluster.pve.revoke_tickets()
    cluster.migrate(101, "pve1")
    wait_for(lambda: tapped(pve1, 101))
    assert trouble_lines(caplog) == []


def test_node_offline_then_back(cluster, running, caplog):
    pve1, agent = running
    wait_for(lambda: tapped(pve1, 100))
    cluster.pve.set_node_offline("pve1")  # its API answers 595 for this node's paths
    wait_for(lambda: agent.trouble is not None)
    assert tapped(pve1, 100)  # an unreachable API never takes taps away
    cluster.pve.set_node_offline("pve1", False)
    cluster.migrate(101, "pve1")
    wait_for(lambda: tapped(pve1, 101))
    lines = trouble_lines(caplog)
    assert len(lines) == 1 and "595" in lines[0], lines


def test_a_status_the_api_cannot_tell_keeps_the_tap(cluster, running, caplog):
    pve1, agent = running
    wait_for(lambda: tapped(pve1, 100))
    cluster.pve.vm(100).status = "unknown"  # what /cluster/resources says when pvestatd lags or hangs
    cycles = agent.cycles
    wait_for(lambda: agent.cycles >= cycles + 3)
    assert tapped(pve1, 100)


def test_unreadable_desired_state_keeps_the_last_copy(cluster, running, caplog, tmp_path):
    pve1, agent = running
    wait_for(lambda: tapped(pve1, 100) and agent.cycles > 0)
    shared = tmp_path / "pmxcfs" / "desired.json"
    good = shared.read_text()
    shared.write_text('{"sessions": [')  # a damaged document
    cycles = agent.cycles
    wait_for(lambda: agent.cycles >= cycles + 3)
    assert tapped(pve1, 100)
    shared.write_text(good)
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "keeping the last copy read" in warnings[0]


def test_slow_migration_mirrors_both_ends_until_the_vm_has_moved(cluster, running, caplog):
    pve1, agent = running
    wait_for(lambda: tapped(pve1, 100))
    assert not tapped(pve1, 101)  # db runs on pve2
    cluster.pve.time_scale = 0.05  # a migration task holds lock=migrate for 20 PVE seconds = 1 s
    cluster.later(cluster.pve.migrate(100, "pve2", secs=20))
    cluster.later(cluster.pve.migrate(101, "pve1", secs=20))  # its incoming QEMU's tap101i0 is here
    wait_for(lambda: cluster.pve.vm(101).lock == "migrate")
    wait_for(lambda: tapped(pve1, 101))
    assert cluster.pve.vm(101).node == "pve2"  # mirrored here before the switch-over
    assert tapped(pve1, 100) and cluster.pve.vm(100).node == "pve1"  # the source keeps its tap meanwhile
    wait_for(lambda: cluster.pve.vm(100).node == "pve2")
    wait_for(lambda: not tapped(pve1, 100))
    assert tapped(pve1, 101)
    assert trouble_lines(caplog) == []
