"""One etcd member (Debian's etcd-server) for the tests and benchmarks: a data dir of its own, loopback ports.

tests/ is on the path (tests/conftest.py); benchmarks put it there themselves.
"""

import base64
import json
import signal
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Etcd:
    """One etcd member; kill() is a real kill -9, start() brings the same data back."""

    def __init__(self, data_dir, name="m0", cluster=None, tls=None, listen_also=None):
        self.data_dir = str(data_dir)
        self.listen_also = listen_also  # one more address clients reach it at (another namespace's side of a veth)
        self.tls = tls  # (cert, key) files: clients over https
        self.name = name
        self.client_port, self.peer_port = free_port(), free_port()
        self.cluster = cluster  # the members of a cluster, this one included; None: alone
        self.process = None
        self.extra = []  # more etcd flags (e.g. --auth-token-ttl), used from the next start()

    @property
    def peer(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str) -> str:
        return f"etcd://{self.endpoint}/{prefix}"

    def start(self, wait=True):
        peer = self.peer
        client = f"{'https' if self.tls else 'http'}://{self.endpoint}"
        members = ",".join(f"{m.name}={m.peer}" for m in (self.cluster or [self]))
        command = [
            "etcd", "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", client + (f",http://{self.listen_also}:{self.client_port}" if self.listen_also else ""),
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", members, "--initial-cluster-token", f"vtap-{(self.cluster or [self])[0].peer_port}",
            "--log-level", "error", "--logger", "zap",
        ] + (["--cert-file", self.tls[0], "--key-file", self.tls[1]] if self.tls else []) + self.extra
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(self.data_dir + ".log", "ab"))
        if wait:
            self.wait_healthy()

    def wait_healthy(self):
        if self.tls:
            return wait_port(self.client_port)
        client = f"http://{self.endpoint}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{client}/health", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"etcd exited: {open(self.data_dir + '.log').read()[-2000:]}")
                time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy in 30 s")

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def status(self) -> dict:
        return json.load(urllib.request.urlopen(f"http://{self.endpoint}/v3/maintenance/status", b"{}", timeout=2))

    def keys(self, prefix: str = "") -> dict:
        """Every key under /prefix with its value, read straight from etcd's v3 JSON gateway."""
        start = f"/{prefix}/" if prefix else "\0"
        end = start[:-1] + chr(ord(start[-1]) + 1) if prefix else "\0"
        body = json.dumps({"key": b64(start), "range_end": b64(end)}).encode()
        reply = json.load(urllib.request.urlopen(f"http://{self.endpoint}/v3/kv/range", body, timeout=5))
        return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in reply.get("kvs", [])}


def wait_port(port):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(1)  # listening; give it its first election
                return
        time.sleep(0.1)
    raise RuntimeError("etcd did not listen in 30 s")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()
