"""vtap's own files are 0600 in 0700 folders whatever the umask, and never opened through a link."""

import os
import stat

import pytest

from vtap_core.errors import OperationFailed
from vtap_core.safefile import open_private, private_dirs, write_private
from vtap_core.store import Store
from vtap_drivers.linux.catalog import Catalog


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    yield
    os.umask(old)


def modes(folder):
    return {name: stat.S_IMODE(os.lstat(os.path.join(folder, name)).st_mode) for name in os.listdir(folder)}


def test_store_catalog_and_locks_are_private_even_with_umask_0(tmp_path, umask_zero):
    state_dir = tmp_path / "new" / "state"
    store = Store(str(state_dir / "vtap.db"))
    store.record("test", {})
    catalog = Catalog(str(state_dir), None)
    with catalog.locked():
        catalog.qdiscs["veth0"] = 5  # something to write: an unchanged catalog is not written again
        catalog.save()
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    found = modes(state_dir)
    assert {"vtap.db", "tc-host.json", "tc-host.json.lock"} <= set(found)
    assert found == {name: 0o600 for name in found}


def test_an_existing_file_of_ours_is_made_private_and_a_link_is_refused(tmp_path, umask_zero):
    old = tmp_path / "vtap.db.lock"
    old.write_text("")
    old.chmod(0o644)  # as an older vtap left it
    os.close(open_private(str(old), os.O_WRONLY | os.O_CREAT))
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "tc-host.json.lock").symlink_to(victim)
    with pytest.raises(OperationFailed, match="symbolic link"):
        open_private(str(tmp_path / "tc-host.json.lock"), os.O_RDWR | os.O_CREAT)
    os.symlink(victim, tmp_path / f"pid.{os.getpid()}.tmp")  # a planted temporary name is removed, not followed
    write_private(str(tmp_path / "pid"), "1\n")
    assert victim.read_text() == "keep" and (tmp_path / "pid").read_text() == "1\n"


def test_private_dirs_creates_every_missing_level_0700(tmp_path, umask_zero):
    private_dirs(str(tmp_path / "a" / "b" / "c"))
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
