"""etcd members started by the tests themselves (Debian's etcd-server), in temp dirs on loopback ports."""

import os
import shutil
import subprocess
import sys

import pytest

from etcd_member import Etcd  # tests/etcd_member.py (tests/ is on the path: tests/conftest.py)


@pytest.fixture
def etcd_tls(tmp_path):
    """A single member serving clients over TLS, with a CA made for the test (openssl)."""
    if shutil.which("etcd") is None or shutil.which("openssl") is None:
        pytest.skip("needs etcd and openssl")
    ca, cert, key = (str(tmp_path / n) for n in ("ca.pem", "server.pem", "server.key"))
    ca_key = str(tmp_path / "ca.key")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=vtap test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", str(tmp_path / "server.csr"), "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(tmp_path / "server.csr"), "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", str(tmp_path / "san.cnf"))
    server = Etcd(tmp_path / "etcd", tls=(cert, key))
    server.start()
    try:
        yield server, ca
    finally:
        server.kill()


@pytest.fixture
def etcd_cluster(tmp_path):
    """Three members on loopback ports, each in its own data dir."""
    if shutil.which("etcd") is None:
        pytest.skip("needs etcd (Debian etcd-server; scripts/setup --test installs it)")
    members = []
    for i in range(3):
        members.append(Etcd(tmp_path / f"etcd{i}", name=f"m{i}", cluster=members))
    try:
        for member in members:
            member.start(wait=False)  # a member is healthy only once a quorum is up
        for member in members:
            member.wait_healthy()
        yield members
    finally:
        for member in members:
            member.kill()


@pytest.fixture
def etcd(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("needs etcd (Debian etcd-server; scripts/setup --test installs it)")
    pytest.importorskip("etcd3gw", reason="needs etcd3gw (scripts/setup installs it)")
    server = Etcd(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def vtap():
    return run_vtap


def run_vtap(*args, state, env=None):
    """The `vtap` CLI as a separate process, with its own local state dir (one 'machine')."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VTAP_")}
    environment.update(env or {})
    command = [sys.executable, "-m", "vtap_cli.main", "--state", state, *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)
