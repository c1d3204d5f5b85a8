"""One vCenter session: connect, verify TLS unless told not to, reconnect with backoff.

The password stays in this object; it is never logged, printed or put in an error.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

import tenacity
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from vtap_core.errors import OperationFailed, TemporaryError, ValidationError
from vtap_core.redact import redact

log = logging.getLogger("vtap.vsphere")

# What a dropped connection or an expired session looks like from pyVmomi.
LOST = (vim.fault.NotAuthenticated, ConnectionError, http.client.HTTPException, socket.timeout, OSError)


def parse_url(url: str):
    """(scheme, host, port, path) of a vCenter SDK URL such as https://vc.example/sdk."""
    if not url:
        raise ValidationError("url", "the vsphere driver needs --url https://VCENTER/sdk (or VTAP_VSPHERE_URL)")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValidationError("url", f"{redact(url)!r} is not an http(s)://HOST[:PORT]/sdk URL")
    if parts.username or parts.password:
        raise ValidationError("url", "put the user in --user and the password in VTAP_VSPHERE_PASSWORD, not in the URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path or "/sdk"


def user_agent() -> str:
    from importlib.metadata import version

    from vtap_core.store import host_name

    return f"vtap/{version('vtap')} ({host_name()}; pid {os.getpid()})"


def as_bool(value) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


class Connection:
    def __init__(self, url: str, user: str | None, password: str | None, insecure=False, timeout: float = 30):
        # Checked when first used, so that a missing setting is a usage error of the
        # command that needs vCenter, not a failure to load the driver.
        self.url = url
        self.user = user
        self._password = password or ""
        self.insecure = as_bool(insecure)
        self.timeout = timeout
        self._si = None
        self._content = None
        self.connects = 0

    def __repr__(self):  # no password here, ever
        return f"Connection({self.url!r}, user={self.user!r}, insecure={self.insecure})"

    @property
    def si(self):
        if self._si is None:
            self._connect()
        return self._si

    @property
    def content(self):
        # RetrieveContent is a round trip each time; the ServiceContent does not change.
        if self._content is None:
            self._content = self.si.RetrieveContent()
        return self._content

    def _connect(self):
        scheme, host, port, path = parse_url(self.url)
        if not self.user:
            raise ValidationError("user", "the vsphere driver needs --user (or VTAP_VSPHERE_USER)")
        try:
            self._si = SmartConnect(
                protocol=scheme,
                host=host,
                port=port,
                path=path,
                user=self.user,
                pwd=self._password,
                disableSslCertValidation=self.insecure,
                # Always a verifying context unless insecure: given none, pyVmomi skips
                # verification for localhost on its own.
                sslContext=None if self.insecure or scheme != "https" else ssl.create_default_context(),
                httpConnectionTimeout=self.timeout,
                # vCenter shows it in its session list (UserSession.userAgent): which machine and process.
                customHeaders={"User-Agent": user_agent()},
            )
        except ssl.SSLCertVerificationError as exc:
            raise OperationFailed(
                f"vsphere: TLS certificate of {host}:{port} is not trusted ({exc.verify_message}); "
                "install its CA certificate, or pass --insecure to skip verification"
            ) from None
        except vim.fault.InvalidLogin:
            raise OperationFailed(f"vsphere: login to {self.url} as {self.user!r} failed: wrong user or password") from None
        except (ConnectionError, socket.timeout, OSError) as exc:
            raise TemporaryError(f"vsphere: cannot reach {self.url}: {exc}") from None
        self.connects += 1

    def reconnect(self, stop: threading.Event | None = None):
        """Drop the session and log in again, with backoff while vCenter is unreachable; a set `stop` ends the backoff."""
        self.close()
        stop = stop or threading.Event()
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TemporaryError),
            wait=tenacity.wait_exponential(multiplier=0.2, max=5),
            stop=tenacity.stop_after_attempt(6) | tenacity.stop_when_event_set(stop),
            sleep=stop.wait,
            reraise=True,
        ):
            with attempt:
                self._connect()
        log.info("vsphere: session to %s re-established", self.url)

    def call(self, action):
        """action(content) with one transparent re-login when the session was lost."""
        try:
            return action(self.content)
        except LOST as exc:
            if isinstance(exc, ssl.SSLError):
                raise
            log.warning("vsphere: session lost (%s), reconnecting", type(exc).__name__)
            self.reconnect()
            return action(self.content)

    def wait(self, task, timeout: float = 300):
        """Wait for a vCenter task; returns its result or raises its fault."""
        delay, deadline = 0.02, time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TemporaryError(f"vsphere: task {task._moId} still running after {timeout:.0f} s")
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                raise info.error
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def close(self):
        if self._si is not None:
            try:
                Disconnect(self._si)
            except Exception:  # the session may be gone already
                pass
            self._si = None
            self._content = None


def fault_text(fault) -> str:
    """One line for a vSphere fault: its type and the message vCenter gave."""
    name = type(fault).__name__.rsplit(".", 1)[-1]
    message = getattr(fault, "msg", "") or ""
    details = []
    for attr in ("invalidProperty", "portKey", "name"):
        value = getattr(fault, attr, None)
        if value:
            details.append(f"{attr}={value}")
    text = name + (f" ({', '.join(details)})" if details else "")
    return f"{text}: {message}" if message and message != name else text

