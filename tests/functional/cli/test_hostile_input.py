"""Hostile or careless input to the CLI (issue 9): exit 2, one line naming the field, nothing changes.

Each case runs against a namespace that already has a session with a flow;
the store (sessions, flows, audit rows) and the kernel's links, qdiscs and
filters are read back after every refusal.
"""

import json
import os
import subprocess
import sys

import pytest

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)

YAML_CASES = {
    "billion laughs": (BILLION_LAUGHS.encode(), "aliases"),
    "deep nesting": (b"sessions: " + b"[" * 100000 + b"]" * 100000 + b"\n", "nested deeper"),
    "not UTF-8": (b"sessions:\n  - name: caf\xe9\n    to: port:mon0\n", "not UTF-8"),
    "UTF-16": ("sessions: []\n".encode("utf-16"), "not UTF-8"),
    "duplicate key": (b"sessions:\n  - name: a\n    name: b\n    to: port:mon0\n", "'name' appears twice"),
    "flows: 5": (b"sessions:\n  - name: a\n    to: port:mon0\n    flows: 5\n", "sessions[0].flows"),
    "interface: [a]": (b"sessions:\n  - name: a\n    to: port:mon0\n    flows:\n      - interface: [eth0]\n", "sessions[0].flows[0].interface"),
    "name with a newline": (b'sessions:\n  - name: "a\\n"\n    to: port:mon0\n', "sessions[0].session name"),
    "NUL in a filter": (b'sessions:\n  - name: a\n    to: port:mon0\n    flows:\n      - interface: eth0\n        filter: "tcp\\0 or udp"\n', "filter"),
    "repeated query key": (b"sessions:\n  - name: a\n    to: vxlan://192.0.2.1?vni=5&vni=6\n", "given twice"),
    "zone id": (b"sessions:\n  - name: a\n    to: vxlan://[fe80::1%eth0]?vni=5\n", "zone id"),
}

ARGV_CASES = {
    "session name with a newline": (["session", "create", "web\n", "--to", "port:mon0"], "session name"),
    "undecodable interface": (["flow", "add", "base", "--interface", b"eth\xff"], "interface"),
    "undecodable filter": (["flow", "add", "base", "--interface", "eth0", "--filter", b"tcp port 80 or host caf\xe9"], "filter"),
    "undecodable pcap path": (["session", "create", "rec", "--to", b"pcap:/tmp/caf\xe9.pcapng"], "target"),
    "repeated vni": (["session", "create", "t", "--to", "vxlan://192.0.2.1?vni=5&vni=6"], "given twice"),
    "zone id": (["session", "create", "t", "--to", "vxlan://[fe80::1%eth0]?vni=5"], "zone id"),
}


def run_vtap(host, args):
    command = ["ip", "netns", "exec", host.name, sys.executable, "-m", "vtap_cli.main", "--state", host.state, *args]
    return subprocess.run(command, capture_output=True, timeout=60)


def state(host):
    audit = json.loads(host.vtap_ok("-o", "json", "audit"))
    return host.store(), len(audit), host.kernel()


@pytest.fixture
def busy_host(host):
    host.vtap_ok("session", "create", "base", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "base", "--interface", "eth0", "--filter", "udp")
    return host


def refused(result, words):
    stderr = result.stderr.decode(errors="replace")
    lines = stderr.strip().splitlines()
    assert result.returncode == 2, stderr
    assert len(lines) == 1 and words in lines[0], stderr


@pytest.mark.parametrize("case", YAML_CASES)
def test_a_hostile_apply_file_is_refused_and_changes_nothing(busy_host, tmp_path, case):
    content, words = YAML_CASES[case]
    path = tmp_path / "taps.yaml"
    path.write_bytes(content)
    before = state(busy_host)
    refused(run_vtap(busy_host, ["apply", "-f", str(path), "--prune"]), words)
    assert state(busy_host) == before


@pytest.mark.parametrize("case", ARGV_CASES)
def test_hostile_arguments_are_refused_and_change_nothing(busy_host, case):
    args, words = ARGV_CASES[case]
    before = state(busy_host)
    refused(run_vtap(busy_host, [os.fsencode(a) if isinstance(a, str) else a for a in args]), words)
    assert state(busy_host) == before


def test_audit_rows_never_hold_a_password_from_a_url(busy_host):
    """Defense in depth: whatever URL reaches the audit log as part of a command is scrubbed."""
    from vtap_core.client import Client

    command = "vtap --config https://admin:s3cretPW@config.example/vtap.toml session create w --to port:mon0"
    with Client(driver="linux", state=busy_host.state, command=command, netns=busy_host.name) as vtap:
        vtap.create_session("w", to="port:mon0")
    rows = json.loads(busy_host.vtap_ok("-o", "json", "audit"))
    assert "s3cretPW" not in json.dumps(rows)
    assert rows[-1]["command"] == "vtap --config https://***@config.example/vtap.toml session create w --to port:mon0"
