"""A password inside a connection URL is refused before anything is written, and never echoed.

The command line goes into the append-only audit log, so `--url
https://user:password@host` must be refused before the store exists, whatever
the driver, and the refusal must not repeat the password.
"""

import os
import subprocess
import sys

import pytest

from vtap_core.redact import redact

SECRET = "s3cretPW"
CASES = [
    (["--driver", "proxmox", "--url", f"https://root%40pam:{SECRET}@127.0.0.1:8006"], {}, "url"),
    (["--driver", "proxmox"], {"VTAP_PROXMOX_URL": f"https://root%40pam:{SECRET}@127.0.0.1:8006"}, "url"),
    (["--driver", "proxmox", "--url", f"https://127.0.0.1:8006/?password={SECRET}"], {}, "url"),
    (["--driver", "vsphere", "--url", f"https://administrator:{SECRET}@127.0.0.1/sdk"], {}, "url"),
    (["--driver", "kvm", "--uri", f"qemu+ssh://root:{SECRET}@127.0.0.1/system"], {}, "uri"),
    (["--driver", "linux", "--url", f"https://admin:{SECRET}@127.0.0.1"], {}, "url"),
]


@pytest.mark.parametrize("options, env, field", CASES, ids=[" ".join(c[0][1:3]) + (" (env)" if c[1] else "") for c in CASES])
def test_credentials_in_a_url_are_refused_before_the_store_exists(tmp_path, options, env, field):
    state = tmp_path / "state" / "vtap.db"
    environ = dict(os.environ, VTAP_PROXMOX_PASSWORD="pw-from-env", VTAP_VSPHERE_PASSWORD="pw-from-env", **env)
    environ.pop("VTAP_CONFIG", None)
    command = [sys.executable, "-m", "vtap_cli.main", "--state", str(state), *options, "session", "create", "w", "--to", "port:eth9"]
    result = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vtap: {field}: ") and "password" in lines[0], lines
    assert SECRET not in result.stdout + result.stderr
    assert not state.parent.exists()  # nothing written: no store, no audit row


def test_a_user_name_alone_is_fine_in_a_libvirt_uri(tmp_path):
    """ssh transports name the remote user in the URI; only a password is refused."""
    from vtap_core.redact import check_url_settings

    check_url_settings({"uri": "qemu+ssh://root@host/system"})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cannot reach https://root:pw@pve:8006/api2/json", "cannot reach https://***@pve:8006/api2/json"),
        ("vtap --url 'https://u@h' x", "vtap --url 'https://***@h' x"),
        ("https://h/?vni=1&token=abc&x=1", "https://h/?vni=1&token=***&x=1"),
        ("vxlan://192.0.2.1?vni=5 and pcap:/tmp/a@b", "vxlan://192.0.2.1?vni=5 and pcap:/tmp/a@b"),
    ],
)
def test_redact_scrubs_userinfo_and_secret_query_values_only(text, expected):
    assert redact(text) == expected


def test_follow_log_lines_are_scrubbed(caplog):
    """`vtap follow` puts this filter on its log handlers: a platform's own error text may carry a URL."""
    import logging

    from vtap_core.redact import RedactingFilter

    caplog.handler.addFilter(RedactingFilter())
    logging.getLogger("vtap.follow").warning("reconcile failed: %s", f"cannot reach https://root:{SECRET}@pve:8006")
    assert SECRET not in caplog.text and "https://***@pve:8006" in caplog.text
