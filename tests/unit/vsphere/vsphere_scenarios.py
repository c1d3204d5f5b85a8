"""The driver conversations kept as cassettes: each scenario runs the vsphere driver and returns
what a user would see (JSON-able), recorded live by record.py and compared on replay."""

from vtap_core.errors import VtapError
from vtap_core.model import Source, TapFlow, TapSession


def bindings(items):
    return [{"key": b.key, "session": b.session, "flow": b.flow, "vm": b.vm, "spec": repr(b.spec)} for b in items]


def create_erspan(driver, meta):
    vm = meta["vms"][0]
    session = TapSession("web", "erspan://192.0.2.7?version=3&id=42", snaplen=96)
    planned = driver.plan([session], [TapFlow("f1", "web", Source(vm=vm), direction="out")])
    driver.apply(planned)
    return {"planned": bindings(planned), "observed": bindings(driver.observe())}


def reapply_is_noop(driver, meta):
    session = TapSession("twice", f"vm:{meta['vms'][2]}")
    flows = [TapFlow("f1", "twice", Source(vm=meta["vms"][1]))]
    for _ in range(2):
        driver.apply(driver.plan([session], flows))
    return {"observed": bindings(driver.observe())}


def delete(driver, meta):
    planned = driver.plan([TapSession("gone", "gre://192.0.2.8")], [TapFlow("f1", "gone", Source(vm=meta["vms"][0]))])
    driver.apply(planned)
    driver.remove(planned)
    return {"observed": bindings(driver.observe())}


def unknown_vm(driver, meta):
    try:
        driver.plan([TapSession("x", "gre://192.0.2.9")], [TapFlow("f1", "x", Source(vm="4b1d0000-0000-4000-8000-000000000000"))])
    except VtapError as exc:
        return {"error": type(exc).__name__, "message": str(exc).replace(meta["url"], "URL")}
    return {"error": None}


def inventory(driver, meta):
    return {"vms": [vm.to_dict() for vm in driver.inventory()]}


SCENARIOS = {f.__name__: f for f in (inventory, create_erspan, reapply_is_noop, delete, unknown_vm)}
