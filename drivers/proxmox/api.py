"""One connection to the PVE API (proxmoxer), with PVE's failures turned into vtap's errors.

Temporary trouble (a node offline, 5xx, a timeout, a refused connection) becomes TemporaryError, which
the agent retries; bad credentials, bad parameters and missing objects are the user's to fix. An expired
ticket is renewed once with the password it was made from. No secret is ever put in a message.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from vtap_core.errors import NotFound, OperationFailed, TemporaryError, ValidationError
from vtap_core.redact import check_url, redact

DEFAULT_PORT = 8006
TIMEOUT = 10  # seconds per request: a hung node must not stall an agent cycle for long
# PVE answers a missing VM with a 500 and this wording (no config file on that node).
MISSING_CONFIG = re.compile(r"Configuration file .* does not exist")


def parse_url(url) -> tuple[str, int]:
    """(host, port) of https://HOST[:PORT]; PVE serves its API on 8006 over TLS only."""
    if not url:
        raise ValidationError("url", "needed: --url https://HOST:8006 or VTAP_PROXMOX_URL")
    check_url("url", url)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValidationError("url", f"{redact(url)!r} is not a URL: {exc}") from None
    if parts.scheme != "https" or not host or parts.path not in ("", "/", "/api2/json"):
        raise ValidationError("url", f"{redact(url)!r}: write https://HOST[:PORT] (the PVE API is HTTPS only)")
    return host, port


class PveApi:
    """GET/PUT/POST against one cluster; counts the requests it makes (the benchmarks read `calls`)."""

    def __init__(self, url=None, user=None, password=None, token_name=None, token_value=None,
                 insecure=False, cafile=None, timeout=TIMEOUT):
        self.url = url
        self.host, self.port = parse_url(url)
        if not user:
            raise ValidationError("user", "needed: --user USER@REALM (e.g. root@pam) or VTAP_PROXMOX_USER")
        if "!" in user and not token_name:
            user, token_name = user.split("!", 1)
        if token_name and not token_value:
            raise ValidationError("token_value", "an API token needs VTAP_PROXMOX_TOKEN_VALUE (environment or config file)")
        if not token_name and not password:
            raise ValidationError("password", "needed: VTAP_PROXMOX_PASSWORD, or an API token (VTAP_PROXMOX_TOKEN_NAME and _VALUE)")
        self.user = user
        self.token_name = token_name
        self.login = f"{user}!{token_name}" if token_name else user
        self._password = password
        self._token_value = token_value
        # TLS verification stays on unless the user said --insecure; a CA file narrows trust to the cluster's CA.
        self.verify = False if insecure else (cafile or True)
        self.timeout = timeout
        self.calls = 0
        self._api = None

    def __repr__(self):
        return f"PveApi({self.url!r}, user={self.login!r})"

    # ------------------------------------------------------------- requests

    def get(self, path: str, **params):
        return self._request("get", path, params)

    def put(self, path: str, **data):
        return self._request("put", path, data)

    def post(self, path: str, **data):
        return self._request("post", path, data)

    def _request(self, verb: str, path: str, data: dict, renewed: bool = False):
        api = self._connect()
        self.calls += 1
        try:
            return getattr(api(path.strip("/")), verb)(**data)
        except ResourceException as exc:
            if exc.status_code == 401 and self._password and not renewed:
                self._api = None  # the ticket expired or was revoked: log in again, once
                return self._request(verb, path, data, renewed=True)
            raise self._error(exc, path) from None
        except requests.exceptions.SSLError as exc:
            raise self._tls_error(exc) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise TemporaryError(f"cannot reach {self.url}: {_reason(exc)}") from None

    def _connect(self):
        if self._api is not None:
            return self._api
        options = dict(host=self.host, port=self.port, user=self.user, verify_ssl=self.verify, timeout=self.timeout)
        if self.token_name:
            options.update(token_name=self.token_name, token_value=self._token_value)
        else:
            options.update(password=self._password)
            self.calls += 1  # the login request
        try:
            self._api = ProxmoxAPI(**options)
        except AuthenticationError:
            raise ValidationError("credentials", f"{self.url} refused the login of {self.login} (check the user and VTAP_PROXMOX_PASSWORD)") from None
        except requests.exceptions.SSLError as exc:
            raise self._tls_error(exc) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise TemporaryError(f"cannot reach {self.url}: {_reason(exc)}") from None
        return self._api

    def _tls_error(self, exc):
        return OperationFailed(f"TLS verification of {self.url} failed ({_reason(exc)}): set cafile (VTAP_PROXMOX_CAFILE) to the cluster's CA, or --insecure")

    def _error(self, exc: ResourceException, path: str):
        text = " ".join(str(exc.content or "").split())
        detail = f"{exc.status_code} {text}".strip()
        if exc.errors:
            detail += f" {exc.errors}"
        if exc.status_code == 401:
            what = "API token" if self.token_name else "login"
            return ValidationError("credentials", f"{self.url} refused the {what} of {self.login} (401)")
        if exc.status_code == 403:
            return OperationFailed(f"{self.login} may not do this on {path}: {detail}")
        if exc.status_code == 400:
            return ValidationError(path, f"PVE refused the parameters: {detail}")
        if MISSING_CONFIG.search(text):
            return NotFound(f"{path}: no such VM on that node ({text})")
        # 500 covers locks and lost quorum; 595/596 a node that does not answer: all worth retrying.
        return TemporaryError(f"PVE API {path}: {detail}")


def _reason(exc) -> str:
    """The innermost reason of a requests error, without URLs full of parameters."""
    while exc.__context__ is not None and exc.args and not isinstance(exc.args[0], str):
        exc = exc.__context__
    text = str(exc.args[0] if exc.args else exc)
    match = re.search(r"\] ([^\]]+)$", text) or re.search(r"Caused by \w+\((.*)$", text)
    return (match.group(1) if match else text).rstrip("'\")").strip("'\"")[:200]
