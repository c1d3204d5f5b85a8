"""The desired state every node of a PVE cluster reads: one JSON document on the cluster file system.

Why not the SQLite store itself: it runs in WAL mode, which needs shared memory that pmxcfs (/etc/pve)
and network file systems do not give, and pmxcfs replicates whole files on every write. So each node
keeps its own store (audit log included), and every successful change also publishes the resulting
sessions and flows to `/etc/pve/vtap/desired.json` (a setting, `shared_state`, for other shared
storage). pmxcfs replaces the file atomically on all nodes. Writing needs quorum: without it the change
fails and is rolled back. Reading works without quorum.

pmxcfs refuses a file larger than 1 MiB (MEMDB_MAX_FILE_SIZE in pve-cluster's memdb): a change whose
document would be larger is refused before anything changes (check_size, called from plan()).

Besides sessions and flows the document carries what the writing node resolved from the API
(`resolved`: each flow's vmid, identity and host devices; each vm: target's device), so the hookscript
applies a VM's taps at post-start from this file and local devices alone, without an API request.

The node agent and the hookscript read this document. When it cannot be read they keep using the last
copy they read (kept in the state folder, so a restarted agent has it too), log one line, and never
remove a tap because the document was unreadable.
"""

from __future__ import annotations

import json
import logging
import os
import time

from vtap_core.errors import OperationFailed, TemporaryError, ValidationError
from vtap_core.model import TapFlow, TapSession

log = logging.getLogger("vtap.proxmox")

PVE_CLUSTER_FS = "/etc/pve"
DEFAULT_PATH = "/etc/pve/vtap/desired.json"
LAST_GOOD = "proxmox-desired.json"
MAX_BYTES = 1024 * 1024  # pmxcfs' limit per file (pve-cluster: MEMDB_MAX_FILE_SIZE)


def default_path() -> str | None:
    """The cluster file system's copy when this is a PVE node, else nothing to share."""
    return DEFAULT_PATH if os.path.isdir(PVE_CLUSTER_FS) else None


def document_text(sessions, flows, node: str, resolved: dict | None = None) -> str:
    document = {
        "version": 1,
        "written": time.time(),
        "node": node,
        "sessions": [s.to_dict() for s in sessions],
        "flows": [f.to_dict() for f in flows],
        "resolved": resolved or {},
    }
    return json.dumps(document, indent=1, sort_keys=True)


def check_size(text: str, path: str) -> None:
    size = len(text.encode())
    if size > MAX_BYTES:
        raise ValidationError("flows", f"the desired state would be {size} bytes, but {path} (pmxcfs) holds at most {MAX_BYTES} bytes "
                                       f"(1 MiB) per file: remove flows or sessions, or shorten filter expressions")


def publish(path: str, sessions, flows, node: str, resolved: dict | None = None) -> None:
    text = document_text(sessions, flows, node, resolved)
    check_size(text, path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OperationFailed(f"cannot publish the desired state to {path} ({exc.strerror}): without it other nodes would not follow this change") from None


def parse(document) -> tuple[list, list]:
    sessions = [TapSession.from_dict(s) for s in document.get("sessions", [])]
    flows = [TapFlow.from_dict(f) for f in document.get("flows", [])]
    return sessions, flows


class DesiredState:
    """Reads the shared document; falls back to the last good copy when it cannot."""

    def __init__(self, path: str, state_dir: str):
        self.path = path
        self.last_good = os.path.join(state_dir, LAST_GOOD)
        self.failing = False
        self.resolved: dict = {}  # from the last document read (see hook_plan.py)

    def load(self) -> tuple[list, list]:
        try:
            with open(self.path) as handle:
                text = handle.read()
            document = json.loads(text)
            result = parse(document)
            self.resolved = document.get("resolved") or {}
        except FileNotFoundError as exc:
            # Its folder there but no file: nothing was ever published. No folder: the cluster file
            # system may not be mounted (pmxcfs down), which must not look like "nothing desired".
            if os.path.isdir(os.path.dirname(self.path)) or not os.path.exists(self.last_good):
                return [], []
            return self._fallback(exc)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            return self._fallback(exc)
        if self.failing:
            log.info("desired state %s readable again", self.path)
            self.failing = False
        self._keep(text)
        return result

    def _fallback(self, exc):
        if not self.failing:
            log.warning("desired state %s unreadable (%s): keeping the last copy read", self.path, exc)
            self.failing = True
        try:
            with open(self.last_good) as handle:
                document = json.load(handle)
            self.resolved = document.get("resolved") or {}
            return parse(document)
        except (OSError, ValueError) as again:
            raise TemporaryError(f"desired state {self.path} unreadable and no earlier copy: {again}") from None

    def _keep(self, text: str):
        try:
            with open(self.last_good) as handle:
                if handle.read() == text:
                    return
        except OSError:
            pass
        tmp = self.last_good + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(text)
        os.replace(tmp, self.last_good)
