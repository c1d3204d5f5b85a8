"""Start the extended govmomi simulator (vcsim/run) for tests and benchmarks.

    with Simulator(hosts=3, vms=6) as sim:
        sim.url, sim.user, sim.password, sim.connect()   # connect(): a pyVmomi ServiceInstance
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

RUN = Path(__file__).resolve().parent / "vcsim" / "run"
CACHED = RUN.parent / ".cache" / "vtap-vcsim"


def available() -> str | None:
    """Why the simulator cannot run here, or None when it can."""
    if not CACHED.exists() and shutil.which("go") is None:
        return "the vSphere simulator is not built and go is missing: run scripts/setup --test"
    return None


def module_simulator(**options):
    """The body of a module-scoped pytest fixture: a running simulator, or a skip saying why not."""
    import pytest

    why = available()
    if why:
        pytest.skip(why)
    with Simulator(**options) as sim:
        yield sim


class Simulator:
    def __init__(self, hosts=3, vms=6, datacenters=1, tls=False, erspan=True, deny_vspan=False, vapi=True, user="vtap-test", password="vcsim-secret",
                 request_log=None):
        self.args = ["--hosts", str(hosts), "--vms", str(vms), "--datacenters", str(datacenters)]
        self.args += (["--tls"] if tls else []) + ([] if erspan else ["--no-erspan"]) + (["--deny-vspan"] if deny_vspan else []) + ([] if vapi else ["--no-vapi"])
        self.args += ["--request-log", str(request_log)] if request_log else []  # one JSON line per vspan change, with its caller
        self.user = user
        self.password = password
        self.process = None
        self.url = None

    def __enter__(self):
        env = dict(os.environ, VCSIM_USERNAME=self.user, VCSIM_PASSWORD=self.password)
        self.process = subprocess.Popen([str(RUN), *self.args], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        line = self.process.stdout.readline().strip()
        if not line.startswith("VCSIM_URL="):
            self.__exit__()
            raise RuntimeError(f"vcsim did not start (first line {line!r})")
        self.url = line.split("=", 1)[1]
        return self

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # only the group this object started
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    @property
    def port(self) -> int:
        return int(re.search(r":(\d+)/", self.url).group(1))

    def connect(self):
        """A direct pyVmomi session (tests read the truth through it, not through the driver)."""
        from pyVim.connect import SmartConnect

        return SmartConnect(
            protocol=self.url.split(":", 1)[0],
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            pwd=self.password,
            disableSslCertValidation=True,
        )
