"""Faults injected for real: kill -9 part way, a full disk, a store emptied, replaced, damaged,
newer or read-only, an interface deleted under a session. Each ends with the kernel read back."""

import errno
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest
import yaml

from datapaths import on_both_datapaths
from vtap_core.store import Store
from vtap_drivers.lab.traffic import Sniffer, send, udp_frame

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
MANY = 100


# ---------------------------------------------------------------- helpers


def vtap_command(host, *args):
    return host.command(*args)


def tc_counts(namespace, devices):
    """(clsact qdiscs, vtap-style bpf filters on the ingress hooks of devices), read over netlink."""
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace) as ipr:
        index = {link.get("ifname"): link["index"] for link in ipr.get_links()}
        wanted = {index[d] for d in devices}
        qdiscs = sum(1 for q in ipr.get_qdiscs() if q.get("kind") == "clsact" and q["index"] in wanted)
        filters = 0
        for device in devices:
            try:
                found = ipr.get_filters(index=index[device], parent=0xFFFFFFF2)
            except Exception:  # no clsact
                continue
            filters += sum(1 for f in found if f.get("kind") == "bpf" and f.get("options") is not None)
    return qdiscs, filters


def step_until(command, condition, timeout=60, slice=0.001):
    """Start command and run it in short slices between SIGSTOPs until condition() holds
    while it is stopped (the kernel and the files are still then). Returns the stopped process, or
    None if it ended first. The caller resumes or kills it."""
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and victim.poll() is None:
        os.kill(victim.pid, signal.SIGSTOP)
        if condition():
            return victim
        os.kill(victim.pid, signal.SIGCONT)
        time.sleep(slice)
    victim.kill()
    victim.wait()
    return None


def kill(victim):
    victim.kill()
    victim.wait()
    assert victim.returncode == -signal.SIGKILL


def many_devices(host):
    names = [f"d{i}" for i in range(MANY)]
    for name in names:
        host.sh("ip", "link", "add", name, "type", "ifb")  # this kernel has no dummy
        host.sh("ip", "link", "set", name, "up")
    return names


def write_yaml(path, sessions):
    path.write_text(yaml.safe_dump({"sessions": sessions}))
    return str(path)


def vtap_filters(host, devices):
    """{(device, hook): cookies} of every bpf filter there: which mirrors the kernel holds."""
    out = {"pins": host.pins()} if host.datapath == "tcx" else {}  # tcx: a pin's name holds its mark
    for device in devices:
        for hook in ("ingress", "egress"):
            cookies = sorted(a.get("cookie") for f in host.filters(device, hook) if "options" in f for a in f["options"].get("actions", []))
            if cookies:
                out[device, hook] = cookies
    return out


def status(host):
    return json.loads(host.vtap_ok("-o", "json", "status"))


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of the test's own (the state dir): it can be filled or made read-only for real."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs")
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "vtap-test", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory):
    """Write a file until the file system says ENOSPC; returns its path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return path


def leftovers_in(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith((".tmp", ".new")))


# ---------------------------------------------------------------- 6: kill -9 during a delete


def many_mirrors(host, tmp_path):
    devices = many_devices(host)
    doc = write_yaml(tmp_path / "many.yaml", [{"name": "many", "to": "port:mon0", "flows": [
        {"name": f"f{i}", "interface": d, "direction": "in", "filter": f"udp port {1000 + i}"} for i, d in enumerate(devices)
    ]}])
    host.vtap_ok("apply", "-f", doc)
    assert tc_counts(host.name, devices) == (MANY, MANY)
    return devices


def audit_rows(host):
    with sqlite3.connect(f"file:{host.state}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM audit").fetchone()[0]


def test_a_delete_killed_after_its_store_write_shows_orphans_and_a_second_delete_removes_them(host, tmp_path):
    devices = many_mirrors(host, tmp_path)
    victim = step_until(vtap_command(host, "session", "delete", "many"), lambda: audit_rows(host) == 2)
    assert victim is not None
    kill(victim)
    assert host.store() == ([], [])  # the store already says: no such session
    qdiscs, filters = tc_counts(host.name, devices)
    assert filters > 0, "the kill should land before the kernel lost every filter"
    rows = status(host)
    assert {row["state"] for row in rows} == {"orphan"}
    assert sum(row["observed"] for row in rows if row["session"] == "many") == filters
    out = host.vtap_ok("session", "delete", "many")
    assert "already deleted" in out
    assert tc_counts(host.name, devices) == (0, 0)  # no filter and no empty clsact left behind
    assert status(host) == []
    result = host.vtap("session", "delete", "many")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_delete_killed_before_its_qdiscs_leaves_no_empty_clsact(host, tmp_path):
    from pyroute2 import IPRoute

    devices = many_mirrors(host, tmp_path)
    with IPRoute(netns=host.name) as ipr:
        first = ipr.link_lookup(ifname=devices[0])[0]

        def filters_gone():  # they go in one batch: the first device's tells
            return not [f for f in ipr.get_filters(index=first, parent=0xFFFFFFF2) if f.get("kind") == "bpf" and f.get("options") is not None]

        victim = step_until(vtap_command(host, "session", "delete", "many"), filters_gone)
    assert victim is not None
    kill(victim)
    qdiscs, filters = tc_counts(host.name, devices)
    assert filters == 0 and qdiscs > 0, "the kill should land after the filters went, before every clsact did"
    rows = status(host)
    assert rows and {row["state"] for row in rows} == {"orphan"}
    assert sum(row["observed"] for row in rows) == qdiscs
    # Any command that reconciles removes them, here one about something else entirely.
    host.vtap_ok("session", "create", "other", "--to", "port:mon0")
    assert tc_counts(host.name, devices) == (0, 0)
    assert status(host) == []


def test_a_flow_delete_killed_after_its_store_write_is_finished_by_deleting_again(host):
    host.vtap_ok("session", "create", "web", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "web", "--interface", "eth0", "--direction", "in", "--name", "eth")
    host.vtap_ok("flow", "add", "web", "--interface", "wire0", "--direction", "in", "--name", "wire")
    victim = step_until(vtap_command(host, "flow", "delete", "eth"), lambda: audit_rows(host) == 4, slice=0.0001)
    assert victim is not None
    kill(victim)
    assert [f["name"] for f in host.store()[1]] == ["wire"]
    assert vtap_filters(host, ["eth0"]), "the kill should land before the kernel lost the filter"
    assert {(row["flow"], row["state"]) for row in status(host)} == {("eth", "orphan"), ("wire", "active")}
    assert "already deleted" in host.vtap_ok("flow", "delete", "eth")
    assert vtap_filters(host, ["eth0"]) == {}
    assert len(vtap_filters(host, ["wire0"])) == 1
    assert [(row["flow"], row["state"]) for row in status(host)] == [("wire", "active")]


# ---------------------------------------------------------------- 7: a full disk


def full_disk_lab(host, tmpfs, tmp_path):
    """20 veth sources mirrored to mon0 (filter udp port N each), the store on the tmpfs.
    Returns the sources and two documents: the one applied, and one that replaces every mirror."""
    host.state = str(tmpfs / "vtap.db")
    sources = []
    for i in range(20):
        host.sh("ip", "link", "add", f"s{i}", "type", "veth", "peer", "name", f"p{i}")
        for end in (f"s{i}", f"p{i}"):
            host.sh("ip", "link", "set", end, "up")
        sources.append(f"s{i}")

    def doc(name, filter_of):
        return write_yaml(tmp_path / name, [{"name": "web", "to": "port:mon0", "flows": [
            {"name": f"f{i}", "interface": s, "direction": "in", "filter": filter_of(i)} for i, s in enumerate(sources)
        ]}])

    first = doc("first.yaml", lambda i: f"udp port {1000 + i}")
    second = doc("second.yaml", lambda i: f"udp port {1000 + i} or tcp port {1000 + i}")
    host.vtap_ok("apply", "-f", first)
    return sources, first, second


def copies_delivered(host, sources):
    """Send one udp frame into each source (its "in"); how many copies arrive at the monitor port."""
    sniffer = Sniffer(host.name, "monpeer")
    try:
        for i, source in enumerate(sources):
            send(host.name, f"p{i}", [udp_frame(A, B, "10.1.0.1", "10.1.0.2", 40000, 1000 + i)])
        return sum(sniffer.settle().values())
    finally:
        sniffer.close()


@on_both_datapaths
def test_a_disk_full_before_an_apply_changes_nothing(host, tmpfs, tmp_path):
    sources, first, second = full_disk_lab(host, tmpfs, tmp_path)
    store, kernel = host.store(), vtap_filters(host, sources)
    reader = sqlite3.connect(host.state)  # keeps the store's -wal/-shm files, so only new writes need space
    try:
        reader.execute("SELECT count(*) FROM audit").fetchone()
        filler = fill(tmpfs)
        result = host.vtap("apply", "-f", second)
    finally:
        reader.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing was changed" in lines[0] and "No space left on device" in lines[0], result.stderr
    assert leftovers_in(tmpfs) == []
    assert vtap_filters(host, sources) == kernel
    assert copies_delivered(host, sources) == len(sources)
    os.unlink(filler)
    assert host.store() == store


@on_both_datapaths
def test_a_disk_filling_up_part_way_through_an_apply_never_costs_the_working_mirrors(host, tmpfs, tmp_path):
    sources, first, second = full_disk_lab(host, tmpfs, tmp_path)
    store_before, kernel_before = host.store(), vtap_filters(host, sources)

    def store_written():
        with sqlite3.connect(f"file:{host.state}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM audit").fetchone()[0] == 2

    # The disk fills the moment the new state is in the store, before the kernel is touched.
    victim = step_until(vtap_command(host, "apply", "-f", second), store_written, slice=0.0001)
    assert victim is not None
    assert vtap_filters(host, sources) == kernel_before, "the disk should fill before the kernel changes"
    filler = fill(tmpfs)
    os.kill(victim.pid, signal.SIGCONT)
    _, err = victim.communicate(timeout=60)
    assert leftovers_in(tmpfs) == []
    kernel_after = vtap_filters(host, sources)
    delivered = copies_delivered(host, sources)
    os.unlink(filler)
    store_after = host.store()
    # Either the change went through whole, or not at all; the mirrors deliver either way.
    assert delivered == len(sources)
    if victim.returncode == 0:
        assert store_after != store_before and kernel_after != kernel_before
        assert {row["state"] for row in status(host)} == {"active"}
        assert {f["name"]: f["filter"] for f in store_after[1]} == {f"f{i}": f"udp port {1000 + i} or tcp port {1000 + i}" for i in range(len(sources))}
    else:
        assert victim.returncode == 1, err
        assert store_after == store_before and kernel_after == kernel_before, err


# ---------------------------------------------------------------- 8: the store refuses to guess


def mirrored(host):
    host.vtap_ok("session", "create", "web", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "web", "--interface", "eth0", "--direction", "in")
    kernel = vtap_filters(host, ["eth0"])
    assert len(kernel) == 1
    return kernel


@on_both_datapaths
def test_a_zero_length_store_is_not_an_empty_desired_state(host):
    kernel = mirrored(host)
    os.truncate(host.state, 0)
    for args in (["follow", "--once"], ["status"], ["session", "list"]):
        result = host.vtap(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and host.state in lines[0] and "0 bytes" in lines[0] and "backup" in lines[0], result.stderr
    assert vtap_filters(host, ["eth0"]) == kernel
    assert os.path.getsize(host.state) == 0


@pytest.mark.parametrize("how", ["replaced", "deleted"])
def test_a_store_replaced_or_deleted_under_a_running_follower_stops_it(host, tmp_path, how):
    kernel = mirrored(host)
    follower = subprocess.Popen(vtap_command(host, "follow", "--interval", "0.3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert follower.poll() is None
        if how == "replaced":
            other = str(tmp_path / "other.db")
            Store(other).close()  # a valid store with no sessions: following it would remove the mirror
            os.rename(other, host.state)
        else:
            os.unlink(host.state)
        _, err = follower.communicate(timeout=15)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 1, err
    assert f"store {host.state} was {how}" in err
    assert vtap_filters(host, ["eth0"]) == kernel


def test_a_store_of_a_newer_schema_is_read_but_never_written(host):
    kernel = mirrored(host)
    with sqlite3.connect(host.state) as db:
        db.execute("ALTER TABLE sessions ADD COLUMN colour TEXT")  # what a newer vtap might have added
        db.execute("UPDATE sessions SET colour='red'")
        db.execute("PRAGMA user_version=2")
    before = os.stat(host.state).st_mtime_ns, open(host.state, "rb").read()
    assert [row["state"] for row in status(host)] == ["active"]
    assert len(json.loads(host.vtap_ok("-o", "json", "audit"))) == 2
    for args in (["session", "create", "db", "--to", "port:mon0"], ["flow", "delete", "web-1"], ["follow", "--once"]):
        result = host.vtap(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "schema version 2" in lines[0] and host.state in lines[0], result.stderr
    assert (os.stat(host.state).st_mtime_ns, open(host.state, "rb").read()) == before
    with sqlite3.connect(host.state) as db:
        assert db.execute("SELECT colour FROM sessions").fetchall() == [("red",)]
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
    assert vtap_filters(host, ["eth0"]) == kernel


def test_a_damaged_store_says_where_it_is_and_what_to_do(host):
    kernel = mirrored(host)
    with open(host.state, "r+b") as f:
        f.write(b"this is no sqlite file at all")
    for args in (["status"], ["follow", "--once"]):
        result = host.vtap(*args)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and host.state in lines[0] and "damaged" in lines[0] and "backup" in lines[0], result.stderr
    assert vtap_filters(host, ["eth0"]) == kernel


def test_a_read_only_store_still_serves_status_and_audit(host, tmpfs):
    host.state = str(tmpfs / "vtap.db")
    kernel = mirrored(host)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    rows = status(host)
    assert [(row["flow"], row["state"]) for row in rows] == [("web-1", "active")]
    assert [row["command"].split("vtap.db ", 1)[1] for row in json.loads(host.vtap_ok("-o", "json", "audit"))] == [
        "session create web --to port:mon0",
        "flow add web --interface eth0 --direction in",
    ]
    assert [s["name"] for s in json.loads(host.vtap_ok("-o", "json", "session", "list"))] == ["web"]
    result = host.vtap("session", "create", "db", "--to", "port:mon0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only" in lines[0] and "nothing was changed" in lines[0], result.stderr
    assert vtap_filters(host, ["eth0"]) == kernel


# ---------------------------------------------------------------- 10: an absent interface in a session


@on_both_datapaths
def test_an_absent_interface_does_not_block_adding_other_flows(host):
    host.sh("ip", "link", "add", "tmp0", "type", "veth", "peer", "name", "tmp1")
    host.vtap_ok("session", "create", "web", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "web", "--interface", "tmp0", "--direction", "in", "--name", "gone")
    host.sh("ip", "link", "del", "tmp0")
    out = host.vtap_ok("flow", "add", "web", "--interface", "eth0", "--direction", "in", "--filter", "udp", "--name", "eth")
    assert "flow eth added" in out
    rows = {row["flow"]: row for row in status(host)}
    assert rows["eth"]["state"] == "active"
    assert rows["gone"]["state"] != "active" and "tmp0" in rows["gone"]["problem"]
    sniffer = Sniffer(host.name, "monpeer")
    try:
        send(host.name, "wire0", [udp_frame(A, B, "10.1.0.1", "10.1.0.2", 40000 + i, 53) for i in range(3)])
        assert sum(sniffer.settle().values()) == 3
    finally:
        sniffer.close()
    # The flow this call adds is still checked: a second absent interface is refused, nothing changes.
    store = host.store()
    result = host.vtap("flow", "add", "web", "--interface", "nosuch0")
    assert result.returncode == 2 and "nosuch0" in result.stderr
    assert host.store() == store
