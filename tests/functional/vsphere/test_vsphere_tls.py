"""TLS is verified unless the user says --insecure; the switch's capabilities decide what is accepted."""

import pytest

from vcsim_simulator import module_simulator
from vtap_core.errors import OperationFailed, Unsupported
from vtap_core.model import Source, TapFlow, TapSession


@pytest.fixture(scope="module")
def tls_vcsim():
    yield from module_simulator(hosts=2, vms=2, tls=True, erspan=False)


def make_driver(sim, tmp_path, **settings):
    from vtap_drivers.vsphere.driver import VsphereDriver

    return VsphereDriver(url=sim.url, user=sim.user, password=sim.password, state_dir=str(tmp_path), **settings)


def test_self_signed_certificate_is_refused_without_insecure(tls_vcsim, tmp_path):
    assert tls_vcsim.url.startswith("https://")
    driver = make_driver(tls_vcsim, tmp_path)
    with pytest.raises(OperationFailed) as raised:
        driver.inventory()
    text = str(raised.value)
    assert "certificate" in text and "--insecure" in text and "\n" not in text
    assert tls_vcsim.password not in text


@pytest.mark.parametrize("insecure", [True, "1"])  # a flag, or VTAP_VSPHERE_INSECURE=1 from the environment
def test_insecure_connects(tls_vcsim, tmp_path, insecure):
    driver = make_driver(tls_vcsim, tmp_path, insecure=insecure)
    assert len(driver.inventory()) == 2
    driver.close()


def test_switch_without_erspan_refuses_erspan_but_not_gre(tls_vcsim, tmp_path):
    si = tls_vcsim.connect()
    driver = make_driver(tls_vcsim, tmp_path, insecure=True)
    vm = driver.inventory()[0]
    flow = [TapFlow("f", "s", Source(vm=vm.uuid))]
    with pytest.raises(Unsupported) as raised:
        driver.plan([TapSession("s", "erspan://192.0.2.1?version=2&id=1")], flow)
    assert "ERSPAN" in str(raised.value) and "DVS0" in str(raised.value)
    bindings = driver.plan([TapSession("s", "gre://192.0.2.1")], flow)
    driver.apply(bindings)
    assert driver.observe() == bindings
    driver.remove(bindings)
    driver.close()
    si.content.sessionManager.Logout()
