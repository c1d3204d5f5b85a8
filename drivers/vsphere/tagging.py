"""vSphere tags, read through vCenter's vAPI tagging service (REST under /rest).

pyVmomi has no tagging client. This one logs in once per session (POST
/rest/com/vmware/cis/session with the vCenter user; the answer is a token sent
as the vmware-api-session-id header), reads every tag's attachments in two
calls (the tag ids, then list-attached-objects-on-tags) and each tag's and
category's name once. A VM tagged `web` in category `tier` gets the tags
`tier:web` and `web`.

Where the endpoint is missing (404: an ESXi host, a vCenter without the vAPI),
`attachments()` answers None and the driver falls back to custom attributes.
The connection is https verified exactly as the SOAP one (the same default SSL
context, no proxy); the password and the token are never logged or put in an error.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time

from vtap_core.errors import OperationFailed, TemporaryError
from vtap_drivers.vsphere.connection import as_bool, parse_url

REST = "/rest/com/vmware/cis"
TOKEN_HEADER = "vmware-api-session-id"
ABSENT = object()  # the service is not there
NAMES_MAX_AGE = 300.0  # seconds a tag's or category's name is reused (a renamed tag keeps its id)


class Tagging:
    def __init__(self, url: str, user: str | None, password: str | None, insecure=False, timeout: float = 30):
        self.url, self.user, self.timeout = url, user, timeout
        self._password = password or ""
        self.insecure = as_bool(insecure)
        self._token = None
        self._names = {}  # tag id -> (category name, tag name); ids never change meaning
        self._categories = {}  # category id -> name
        self._names_read = 0.0

    def __repr__(self):  # no password or token here, ever
        return f"Tagging({self.url!r}, user={self.user!r})"

    def attachments(self) -> dict[str, tuple[str, ...]] | None:
        """VM moref id -> its tags (`category:tag` and `tag`); None when vCenter has no tagging service."""
        if self._token is ABSENT:
            return None
        ids = self._request("GET", "/tagging/tag")
        if ids is ABSENT:
            return None
        if time.monotonic() - self._names_read > NAMES_MAX_AGE:
            self._names.clear()
            self._categories.clear()
            self._names_read = time.monotonic()
        attached = self._request("POST", "/tagging/tag-association?~action=list-attached-objects-on-tags", {"tag_ids": ids or []}) if ids else []
        tags = {}
        for entry in attached or ():
            names = self._name(entry["tag_id"])
            if names is None:
                continue  # deleted since it was listed
            category, name = names
            for obj in entry.get("object_ids") or ():
                if obj.get("type") == "VirtualMachine":
                    tags.setdefault(obj["id"], []).extend((f"{category}:{name}", name))
        return {moid: tuple(dict.fromkeys(values)) for moid, values in tags.items()}

    def close(self):
        """Log the vAPI session out (vCenter limits how many sessions a user may hold)."""
        token, self._token = self._token, None
        if token and token is not ABSENT:
            try:
                self._send("DELETE", REST + "/session", None, {TOKEN_HEADER: token})
            except (OperationFailed, TemporaryError):
                pass  # vCenter drops idle sessions itself

    def _name(self, tag_id):
        """(category name, tag name), or None when the tag or its category is gone."""
        if tag_id not in self._names:
            tag = self._request("GET", f"/tagging/tag/id:{tag_id}", missing_ok=True)
            if not tag:
                return None
            category = tag["category_id"]
            if category not in self._categories:
                found = self._request("GET", f"/tagging/category/id:{category}", missing_ok=True)
                if not found:
                    return None
                self._categories[category] = found["name"]
            self._names[tag_id] = (self._categories[category], tag["name"])
        return self._names[tag_id]

    def _request(self, method, path, body=None, retry=True, missing_ok=False):
        if self._token is None:
            self._login()
            if self._token is ABSENT:
                return ABSENT
        status, answer = self._send(method, REST + path, body, {TOKEN_HEADER: self._token})
        if status == 401 and retry:  # the token expired: log in again, once
            self._token = None
            return self._request(method, path, body, retry=False, missing_ok=missing_ok)
        if status == 404 and missing_ok:
            return None
        if status != 200:
            raise OperationFailed(f"vsphere: tagging service {method} {path.split('?')[0]} answered HTTP {status}")
        return answer.get("value") if answer else None

    def _login(self):
        auth = base64.b64encode(f"{self.user}:{self._password}".encode()).decode()
        status, answer = self._send("POST", REST + "/session", None, {"Authorization": f"Basic {auth}"})
        if status == 404:
            self._token = ABSENT
        elif status in (401, 403):
            raise OperationFailed(f"vsphere: tagging service login as {self.user!r} refused (HTTP {status})")
        elif status != 200 or not answer or not answer.get("value"):
            raise OperationFailed(f"vsphere: tagging service login answered HTTP {status}")
        else:
            self._token = answer["value"]

    def _send(self, method, path, body, headers):
        scheme, host, port, _ = parse_url(self.url)
        if scheme == "https":
            context = ssl._create_unverified_context() if self.insecure else ssl.create_default_context()
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        try:
            connection.request(method, path, body=data, headers={**headers, "Content-Type": "application/json", "Accept": "application/json"})
            response = connection.getresponse()
            raw = response.read()
        except ssl.SSLCertVerificationError as exc:
            raise OperationFailed(f"vsphere: TLS certificate of {host}:{port} is not trusted ({exc.verify_message})") from None
        except (ConnectionError, socket.timeout, OSError, http.client.HTTPException) as exc:
            raise TemporaryError(f"vsphere: tagging service at {host}:{port} unreachable: {type(exc).__name__}") from None
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw) if raw.strip() else None
        except ValueError:
            return response.status, None
