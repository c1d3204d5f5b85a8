"""vtap runs as root: the files it writes are private and never reached through another user's plant.

The attacker is the `nobody` user (setpriv), working in a fresh world-writable
sticky folder like /tmp. vtap, as root, must refuse the pcap target or
`capture -w` file before anything changes: the store (sessions, flows, audit
rows), the kernel's links/qdiscs/filters and the attacker's plant are read
back before and after.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
import yaml

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def as_nobody(*args, check=True):
    return subprocess.run([*NOBODY, *args], capture_output=True, text=True, check=check)


@pytest.fixture
def sticky_dir():
    """A fresh folder like /tmp: mode 1777, owned by root."""
    folder = tempfile.mkdtemp(prefix="vtap-sticky-", dir="/tmp")
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def victim(tmp_path):
    """A root-only file the attacker would like vtap to overwrite or append to."""
    path = tmp_path / "victim"
    path.write_bytes(b"root's secret\n")
    path.chmod(0o600)
    return path


def plant(kind, path, victim):
    """The attacker's plant at `path`, made as nobody."""
    if kind == "symlink to a root file":
        as_nobody("ln", "-s", str(victim), path)
    elif kind == "dangling symlink":
        as_nobody("ln", "-s", str(victim.parent / "created-by-root"), path)
    elif kind == "fifo":
        as_nobody("mkfifo", "-m", "0666", path)
    elif kind == "world-readable file":
        as_nobody("sh", "-c", f"umask 0; : > {path}")
    elif kind == "symlinked folder":
        as_nobody("ln", "-s", str(victim.parent), os.path.dirname(path))


def snapshot(host, folder, victim):
    audit = json.loads(host.vtap_ok("-o", "json", "audit"))
    files = sorted((name, os.lstat(os.path.join(folder, name)).st_mode) for name in os.listdir(folder))
    return host.store(), len(audit), host.kernel(), files, victim.read_bytes(), sorted(os.listdir(victim.parent))


PLANTS = [
    ("symlink to a root file", "symbolic link"),
    ("dangling symlink", "symbolic link"),
    ("fifo", "not a regular file"),
    ("world-readable file", "belongs to uid 65534"),
    ("symlinked folder", "symbolic link another user controls"),
    ("root's own file that is not pcapng", "not a pcapng file"),  # used to be refused after the store write
]


@pytest.mark.parametrize("kind, words", PLANTS, ids=[p[0] for p in PLANTS])
def test_pcap_target_planted_by_another_user_is_refused_before_anything_changes(host, tmp_path, sticky_dir, victim, kind, words):
    host.vtap_ok("session", "create", "base", "--to", "port:mon0")
    target = os.path.join(sticky_dir, "sub" if kind == "symlinked folder" else "", "cap.pcapng")
    if kind == "root's own file that is not pcapng":
        target = str(victim)
    plant(kind, target, victim)
    doc = tmp_path / "taps.yaml"
    doc.write_text(yaml.safe_dump({"sessions": [{"name": "rec", "to": f"pcap:{target}", "flows": [{"interface": "eth0"}]}]}))
    before = snapshot(host, sticky_dir, victim)
    for args in (["apply", "-f", str(doc)], ["session", "create", "rec", "--to", f"pcap:{target}"]):
        result = host.vtap(*args, timeout=60)  # a FIFO used to hang every later command
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vtap: target") and words in lines[0], lines
        assert snapshot(host, sticky_dir, victim) == before


def test_capture_w_does_not_write_through_a_planted_symlink(host, sticky_dir, victim):
    target = os.path.join(sticky_dir, "stream.pcapng")
    plant("symlink to a root file", target, victim)
    result = host.vtap("capture", "--listen", "vxlan://127.0.0.1:4790", "-w", target, "--duration", "1", timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "symbolic link" in result.stderr, result.stderr
    assert victim.read_bytes() == b"root's secret\n"


def test_a_new_pcap_file_in_a_sticky_folder_is_private_and_written(host, sticky_dir):
    target = os.path.join(sticky_dir, "cap.pcapng")
    host.vtap_ok("session", "create", "rec", "--to", f"pcap:{target}")
    host.vtap_ok("flow", "add", "rec", "--interface", "eth0")
    info = os.lstat(target)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    assert as_nobody("cat", target, check=False).returncode != 0
    host.vtap_ok("session", "delete", "rec")
    # A capture file of vtap's own is appended to again.
    host.vtap_ok("session", "create", "rec", "--to", f"pcap:{target}")
    host.vtap_ok("flow", "add", "rec", "--interface", "eth0")
    host.vtap_ok("session", "delete", "rec")


def test_every_file_vtap_writes_is_private_and_unreadable_to_other_users(host):
    parent = tempfile.mkdtemp(prefix="vtap-state-", dir="/tmp")
    os.chmod(parent, 0o755)
    state_dir = os.path.join(parent, "new", "sub")
    host.state = os.path.join(state_dir, "vtap.db")
    umask = os.umask(0)  # vtap's modes must not depend on the umask it was started with
    try:
        host.vtap_ok("session", "create", "rec", "--to", f"pcap:{parent}/cap.pcapng")
        host.vtap_ok("flow", "add", "rec", "--interface", "eth0")
        for folder in (os.path.join(parent, "new"), state_dir):
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
        names = sorted(os.listdir(state_dir))
        for kind in ("vtap.db", "vtap.db.lock", "tc-", "capture-"):
            assert any(n.startswith(kind) for n in names), (kind, names)  # catalog, locks, pid and log files
        modes = {name: stat.S_IMODE(os.stat(os.path.join(state_dir, name)).st_mode) for name in names}
        assert modes == {name: 0o600 for name in names}
        # Even in a state folder others can enter (made by someone else), nobody reads a thing.
        os.chmod(state_dir, 0o755)
        for name in names:
            assert as_nobody("cat", os.path.join(state_dir, name), check=False).returncode != 0, name
        host.vtap_ok("session", "delete", "rec")
    finally:
        os.umask(umask)
        shutil.rmtree(parent)
