"""The command line: help is fast and loads no driver; usage errors are one line, exit 2."""

import json
import os
import subprocess
import sys

HEAVY = ("pyVmomi", "proxmoxer", "libvirt", "pyroute2", "vtap_drivers.kvm.driver", "vtap_drivers.vsphere.driver")


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vtap_cli.main", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_help_imports_no_driver():
    code = "import sys; from vtap_cli.main import build_parser; build_parser().format_help(); print(sorted(m for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert not [m for m in HEAVY if m in loaded]
    import vtap_core  # noqa: F401  importing the core is as cheap

    code = "import sys, vtap_core, vtap_core.client; print(sorted(sys.modules))"
    loaded = set(eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert not [m for m in HEAVY if m in loaded]


def test_usage_errors_are_one_line_exit_2(tmp_path):
    state = str(tmp_path / "s.db")
    for args in (
        ["flow", "add"],
        ["session", "create", "x"],
        ["--state", state, "session", "create", "x", "--to", "nonsense"],
        ["--state", state, "session", "create", "x", "--to", "vxlan://192.0.2.1?vni=99999999"],
        ["--driver", "nope", "--state", state, "session", "list"],
        ["--password", "hunter2", "vm", "list"],
        ["--state", state, "-o", "xml", "session", "list"],
    ):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_listing_formats(tmp_path):
    state = str(tmp_path / "s.db")
    assert json.loads(run("--state", state, "-o", "json", "session", "list").stdout) == []
    assert run("--state", state, "session", "list", "-o", "yaml").stdout.strip() == "[]"
    drivers = json.loads(run("drivers", "-o", "json").stdout)
    assert {"linux", "lab", "kvm", "vsphere", "proxmox"} <= {d["name"] for d in drivers}


def test_a_driver_that_cannot_load_is_a_clear_error(tmp_path):
    # libvirt made unimportable in this process only: the kvm driver's module fails to import.
    code = (
        "import sys; sys.modules['libvirt'] = None; from vtap_cli.main import main; "
        f"sys.exit(main(['--driver', 'kvm', '--state', {str(tmp_path / 's.db')!r}, 'vm', 'list']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "vtap: driver kvm failed to load: missing Python module 'libvirt'"
