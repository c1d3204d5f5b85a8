"""The hookscript as PVE runs it (`<script> <vmid> <phase>`): it never blocks a guest unless --strict,
and then only at pre-start; post-start applies from the published document with no API request."""

import json
import subprocess
import time

from pve_lab import cli_env, vtap, vtap_command

from test_proxmox_follow import install_snippet, run_as_pve

UNREACHABLE = "https://127.0.0.1:1"  # nothing listens: any API request fails at once
PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")


def timed(snippet, env, vmid, phase):
    started = time.monotonic()
    result = run_as_pve(snippet, env, vmid, phase)
    return result, time.monotonic() - started


def test_post_start_applies_from_the_document_without_the_api(cluster, nodes, tmp_path):
    """What a live migration's target runs inside `qm start`: the API is not asked (here: not reachable)."""
    cluster.add_vm(100, "web", "pve1", status="stopped")
    pve1 = nodes("pve1")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    snippet = install_snippet(cluster, tmp_path, env)
    assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
    assert vtap(env, "flow", "add", "web", "--vm", "100", "--direction", "out").returncode == 0
    document = json.loads((tmp_path / "pmxcfs" / "vtap" / "desired.json").read_text())
    assert document["resolved"]["flows"]["web-1"] == {"vmid": 100, "identity": document["resolved"]["flows"]["web-1"]["identity"], "devices": ["tap100i0"]}
    pve1.add_tap(100)
    offline = dict(env, VTAP_PROXMOX_URL=UNREACHABLE)
    result = run_as_pve(snippet, offline, 100, "post-start")
    assert result.returncode == 0 and "VM 100 post-start on pve1: 1 applied, 0 removed" in result.stderr, result.stderr
    pve1.send_from_vm(100, count=5)
    assert pve1.received() == 5
    again = run_as_pve(snippet, offline, 100, "post-start")
    assert "0 applied, 0 removed" in again.stderr, again.stderr  # idempotent
    result = run_as_pve(snippet, offline, 100, "pre-stop")
    assert result.returncode == 0 and "0 applied, 1 removed" in result.stderr, result.stderr
    assert pve1.filters("tap100i0") == ""


def test_missing_or_broken_vtap_never_blocks_a_start(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    pve1 = nodes("pve1")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    snippet = install_snippet(cluster, tmp_path, env)
    command = vtap_command(tmp_path)
    bare = dict(env, PATH="/usr/bin:/bin")  # PVE's own PATH: no vtap there, only the installer's path

    # Phases vtap does not use: exit 0 at once, vtap not even run.
    for phase in ("pre-start", "no-such-phase"):
        result, took = timed(snippet, bare, 100, phase)
        assert (result.returncode, result.stderr, took < 0.5) == (0, "", True), (phase, result, took)

    command.rename(command.with_name("vtap.away"))  # vtap missing on this node
    for phase in PHASES:
        result, took = timed(snippet, bare, 100, phase)
        assert result.returncode == 0 and took < 0.5, (phase, result, took)
    assert "vtap is not installed on this node" in run_as_pve(snippet, bare, 100, "post-start").stderr

    command.write_text("#!/bin/sh\necho 'Traceback: ImportError: no module named vtap_core' >&2\nexit 1\n")  # vtap broken
    command.chmod(0o755)
    for phase in PHASES:
        result = run_as_pve(snippet, bare, 100, phase)
        assert result.returncode == 0, (phase, result)
    assert "vtap failed (exit 1), VM continues without its taps" in run_as_pve(snippet, bare, 100, "post-start").stderr


def test_strict_can_fail_only_pre_start(cluster, nodes, tmp_path):
    cluster.add_vm(100, "web", "pve1")
    pve1 = nodes("pve1")
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    install_snippet(cluster, tmp_path, env)
    result = vtap(env, "hook", "install", "--vm", "100", "--storage", "snip", "--strict")
    assert result.returncode == 0, result.stderr
    snippet = str(tmp_path / "snip-storage" / "snippets" / "vtap-hook.sh")
    bare = dict(env, PATH="/usr/bin:/bin")
    assert [run_as_pve(snippet, bare, 100, phase).returncode for phase in PHASES] == [0, 0, 0, 0]  # vtap works

    # A configuration vtap cannot use (a shared-state document that is not JSON, no earlier copy).
    (tmp_path / "pmxcfs" / "vtap").mkdir(parents=True, exist_ok=True)
    (tmp_path / "pmxcfs" / "vtap" / "desired.json").write_text("{damaged")
    codes = {phase: run_as_pve(snippet, bare, 100, phase) for phase in PHASES}
    assert codes["pre-start"].returncode == 1 and "strict mode" in codes["pre-start"].stderr, codes["pre-start"]
    assert [codes[p].returncode for p in PHASES[1:]] == [0, 0, 0], codes

    command = vtap_command(tmp_path)
    command.rename(command.with_name("vtap.away"))  # vtap missing on this node
    assert [run_as_pve(snippet, bare, 100, phase).returncode for phase in PHASES] == [1, 0, 0, 0]
    assert run_as_pve(snippet, bare, 100, "no-such-phase").returncode == 0


def test_desired_state_over_pmxcfs_limit_is_refused_and_nothing_changes(cluster, nodes, tmp_path):
    """pmxcfs holds at most 1 MiB per file: a change whose published document would be larger is refused."""
    cluster.add_vm(100, "web", "pve1")
    pve1 = nodes("pve1")
    pve1.add_tap(100)
    env = cli_env(cluster, "pve1", tmp_path, VTAP_PROXMOX_NETNS=pve1.name)
    assert vtap(env, "session", "create", "web", "--to", "port:mon0").returncode == 0
    assert vtap(env, "flow", "add", "web", "--vm", "100", "--direction", "out").returncode == 0
    shared = tmp_path / "pmxcfs" / "vtap" / "desired.json"
    before = (shared.read_bytes(), vtap(env, "flow", "list", "-o", "json").stdout, pve1.filters("tap100i0"))

    hosts = " or ".join(f"host 10.1.{i // 250}.{i % 250}" for i in range(200))  # ~3.8 kB per flow, 400 flows: ~1.5 MB
    flows = "".join(f"      - {{vm: '100', direction: in, filter: '{hosts}'}}\n" for _ in range(400))
    big = tmp_path / "big.yaml"
    big.write_text(f"sessions:\n  - name: big\n    to: port:mon0\n    flows:\n{flows}")
    result = vtap(env, "apply", "-f", str(big), timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "holds at most 1048576 bytes (1 MiB) per file" in line and str(shared) in line, line
    assert (shared.read_bytes(), vtap(env, "flow", "list", "-o", "json").stdout, pve1.filters("tap100i0")) == before
