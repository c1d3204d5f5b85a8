"""The kvm driver's inventory between full reads: while domain events flow, a reconcile about one VM
reads again only the domains events named (a new domain, a retag, an undefine), against libvirt's own
test driver (in-process: no daemon, no root). Without a live event subscription, every read is full."""

import threading
import uuid as uuidlib

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")

from vtap_drivers.kvm.driver import KvmDriver

from .kvm_lab import wait_for

URI = "test:///default"  # one in-process driver per process: the driver's connections and ours see the same domains


def domain_xml(name: str, uuid: str, tags=()) -> str:
    tag_xml = "".join(f"<vtap:tag>{t}</vtap:tag>" for t in tags)
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
        f"<metadata><vtap:tags xmlns:vtap='urn:vtap:1'>{tag_xml}</vtap:tags></metadata>"
        "<memory>65536</memory><os><type>hvm</type></os><devices>"
        "<interface type='bridge'><mac address='52:54:00:42:00:01'/><source bridge='br0'/></interface></devices></domain>"
    )


@pytest.fixture
def following(tmp_path):
    """A kvm driver whose event watch runs (as under `vtap follow`), the hints it yields, and a connection of our own."""
    driver = KvmDriver(uri=URI, state_dir=str(tmp_path))
    stop, hints = threading.Event(), []
    watcher = threading.Thread(target=lambda: hints.extend(driver.watch(stop)), daemon=True)
    watcher.start()
    wait_for(lambda: driver.libvirt.listening, 10, "the event subscription")
    conn = libvirt.open(URI)
    made = []
    yield driver, hints, conn, made
    stop.set()
    watcher.join(5)
    for dom_uuid in made:
        try:
            dom = conn.lookupByUUIDString(dom_uuid)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
    conn.close()
    driver.close()


def scoped_inventory(driver, vm):
    driver.focus(vm)
    try:
        return {v.uuid: v for v in driver.inventory()}
    finally:
        driver.focus(None)
        driver._memo = None


def test_a_reconcile_about_one_vm_sees_what_its_events_changed(following):
    driver, hints, conn, made = following
    first = str(uuidlib.uuid4())
    made.append(first)
    conn.defineXML(domain_xml(f"inv-{first[:8]}", first, ["lab"])).create()
    full = {v.uuid: v for v in driver.inventory()}  # a full read, as every resync does
    driver._memo = None
    assert full[first].tags == ("lab",)

    # A new domain, defined and started: its events name it; the scoped read has it, running.
    second = str(uuidlib.uuid4())
    made.append(second)
    conn.defineXML(domain_xml(f"inv-{second[:8]}", second, ["pci"])).create()
    wait_for(lambda: second in hints, 10, "the new domain's event")
    seen = scoped_inventory(driver, second)
    assert seen[second].state == "running" and seen[second].tags == ("pci",)
    assert seen[first] is full[first]  # not read again: nothing happened to it

    # A retag (the metadata-change event) is read again too.
    hints.clear()
    conn.lookupByUUIDString(first).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<tags><tag>pci</tag></tags>", "vtap", "urn:vtap:1", libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    wait_for(lambda: first in hints, 10, "the retag's event")
    assert scoped_inventory(driver, first)[first].tags == ("pci",)

    # Undefined: gone from the next scoped read.
    hints.clear()
    dom = conn.lookupByUUIDString(second)
    dom.destroy()
    dom.undefine()
    wait_for(lambda: second in hints, 10, "the undefine's event")
    assert second not in scoped_inventory(driver, second)


def test_without_a_live_event_subscription_every_read_is_full(tmp_path):
    driver = KvmDriver(uri=URI, state_dir=str(tmp_path))  # no watch: nobody tells it what changed
    conn = libvirt.open(URI)
    made = str(uuidlib.uuid4())
    try:
        assert made not in {v.uuid for v in driver.inventory()}
        driver._memo = None
        conn.defineXML(domain_xml(f"inv-{made[:8]}", made))
        assert made in scoped_inventory(driver, made)
    finally:
        conn.lookupByUUIDString(made).undefine()
        conn.close()
        driver.close()


def test_a_vm_started_during_a_status_read_is_seen_by_the_reconcile_its_event_causes(following):
    """An agent's status report reads the inventory beside its follower: a VM that starts while that
    read runs must not be missing from the reconcile its start event causes (it waited for a resync)."""
    driver, hints, conn, made = following
    started = str(uuidlib.uuid4())
    made.append(started)
    call = driver.libvirt.call

    def read_then_start(fn):
        result = call(fn)  # the status report's full read, done before the VM exists
        conn.defineXML(domain_xml(f"inv-{started[:8]}", started)).create()
        wait_for(lambda: started in hints, 10, "the start event")  # the follower heard it...
        return result

    driver.libvirt.call = read_then_start
    try:
        assert started not in {v.uuid for v in driver.inventory()}
    finally:
        driver.libvirt.call = call
    driver.focus(started)  # ...and reconciles that VM at once, within the read's reuse time
    try:
        assert started in {v.uuid for v in driver.inventory()}
    finally:
        driver.focus(None)
