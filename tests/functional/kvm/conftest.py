"""Fixtures of the kvm tests: one libvirtd and one Open vSwitch for the whole run, and
per test a bridge with a peer to ping, a monitor port to count copies on, and guests."""

from __future__ import annotations

import os
import shutil

import pytest

from . import kvm_lab as lab


def _require():
    if os.geteuid() != 0:
        pytest.skip("needs root: starts libvirtd, QEMU, Open vSwitch and creates bridges")
    for tool in ("libvirtd", "qemu-system-x86_64", "ovs-vswitchd", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: run scripts/setup --test")
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: run scripts/setup --test")
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors are raised anyway; don't print them too


@pytest.fixture(scope="session")
def kvm_workdir(tmp_path_factory):
    _require()
    return tmp_path_factory.mktemp("vtapkvm")


@pytest.fixture(scope="session")
def ovs(kvm_workdir):
    daemons = lab.OvsDaemons(kvm_workdir).start()
    yield daemons
    daemons.stop()


@pytest.fixture(scope="session")
def libvirt_host(kvm_workdir, ovs):
    host = lab.LibvirtHost(kvm_workdir, "host1", ovs_rundir=ovs.dir).start()
    yield host
    host.close()


@pytest.fixture
def lan(kvm_workdir):
    with lab.make_lan() as made:
        yield made


@pytest.fixture
def ovs_lan(ovs):
    with lab.make_lan(ovs) as made:
        yield made


@pytest.fixture
def guests(libvirt_host, kvm_workdir):
    made = lab.Guests(libvirt_host, kvm_workdir)
    yield made
    made.close()


@pytest.fixture(scope="module")
def module_guests(libvirt_host, kvm_workdir):
    """Guests shared by the tests of one module (a boot under TCG takes 10-20 s)."""
    made = lab.Guests(libvirt_host, kvm_workdir)
    yield made
    made.close()
