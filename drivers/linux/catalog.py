"""What vtap put in one network namespace: mark -> binding, and the clsact qdiscs it added.

The kernel holds only a 16-byte mark (a tc action cookie, a device alias);
the catalog maps each mark back to the Binding (key and spec) it stands for,
so observe() can return what plan() returned. It is written before anything
is put in the kernel, so whatever a killed process left is still named here.

One JSON file per namespace in the state dir. The same file's flock also
serializes apply/remove between vtap processes (a CLI command and a follower).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager

from vtap_core.driver import Binding
from vtap_core.errors import OperationFailed

MARK_PREFIX = "vtap:"  # device aliases: "vtap:<32 hex digits>"
MARK_MAGIC = b"vt"  # a mark: MARK_MAGIC, 2 bytes naming the state dir, 12 bytes of digest
GENERATION_HEAD = '{"generation": "'
GENERATION_LENGTH = 16


def store_prefix(state_dir: str) -> bytes:
    """The first 4 bytes of every mark this state dir makes.

    Two vtap stores on one host (or tests running side by side) then never take
    each other's filters for orphans, and other tools' 16-byte cookies are never
    taken for vtap's.
    """
    return MARK_MAGIC + hashlib.sha256(os.path.realpath(state_dir).encode()).digest()[:2]


def digest_of(binding: Binding) -> bytes:
    """12 bytes naming a binding's key and spec (a changed spec is a different mark)."""
    text = json.dumps([binding.key, binding.session, binding.flow, binding.vm, [list(p) for p in binding.spec]], sort_keys=True)
    return hashlib.sha256(text.encode()).digest()[:12]


def mark_from_alias(alias: str | None) -> bytes | None:
    """The mark in a device alias "vtap:<hex>" (any vtap store's), else None."""
    if not alias or not alias.startswith(MARK_PREFIX):
        return None
    try:
        mark = bytes.fromhex(alias[len(MARK_PREFIX) :].split()[0])
    except (ValueError, IndexError):
        return None
    return mark if len(mark) == 16 and mark.startswith(MARK_MAGIC) else None


def _to_dict(binding: Binding) -> dict:
    return {
        "key": binding.key,
        "session": binding.session,
        "flow": binding.flow,
        "vm": binding.vm,
        "spec": [list(pair) for pair in binding.spec],
        "order": binding.order,
    }


def _from_dict(data: dict) -> Binding:
    return Binding(
        key=data["key"],
        session=data["session"],
        flow=data.get("flow"),
        vm=data.get("vm"),
        spec=tuple(map(tuple, data["spec"])),
        order=data.get("order", 1),
    )


class Catalog:
    """Marks and qdiscs of one namespace, in STATE_DIR/tc-<netns or host>.json."""

    def __init__(self, state_dir: str, netns: str | None):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, f"tc-{netns or 'host'}.json")
        self.prefix = store_prefix(state_dir)
        self.bindings: dict[str, dict] = {}  # mark hex -> binding dict
        self.qdiscs: dict[str, int] = {}  # device name -> ifindex of a clsact vtap added
        self.failures: dict[str, list] = {}  # binding key -> [session, flow, why] of its last failed apply
        self._generation = None  # of the file as last read or written
        self._hooks = None  # mirror_hooks(), computed once per content

    # ------------------------------------------------------------ file

    def load(self) -> "Catalog":
        """Read the file, unless memory holds what it holds (its generation; observe runs often)."""
        try:
            with open(self.path) as f:
                head = f.read(len(GENERATION_HEAD) + GENERATION_LENGTH)
                if self._generation and head == GENERATION_HEAD + self._generation:
                    return self
                f.seek(0)
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except json.JSONDecodeError as exc:
            raise OperationFailed(f"{self.path} is not a vtap catalog ({exc}); move it away to start afresh") from None
        self.bindings = data.get("bindings", {})
        self.qdiscs = data.get("qdiscs", {})
        self.failures = data.get("failures", {})
        self._generation = data.get("generation")
        self._hooks = None
        return self

    def save(self) -> None:
        generation = os.urandom(GENERATION_LENGTH // 2).hex()
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            # The generation first, so load() can tell an unchanged file from its first bytes.
            f.write(json.dumps({"generation": generation, "bindings": self.bindings, "qdiscs": self.qdiscs, "failures": self.failures}))
        os.replace(temporary, self.path)
        self._generation = generation

    @contextmanager
    def locked(self, shared: bool = False):
        """This namespace's catalog, read fresh, with vtap's changes in the namespace held still.

        apply/remove take it exclusively; observe shared, so it never reads the
        kernel half way through another process's apply (and takes that one's
        new mirrors for orphans).
        """
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self.load()
            yield self
        except BaseException:
            self._generation = None  # memory may hold changes the file does not: read it again next time
            raise
        finally:
            os.close(fd)

    # ------------------------------------------------------------ marks

    def mark_of(self, binding: Binding) -> bytes:
        """The 16 bytes this store puts in the kernel for a binding."""
        return self.prefix + digest_of(binding)

    def alias_of(self, binding: Binding) -> str:
        return MARK_PREFIX + self.mark_of(binding).hex()

    def owns(self, mark: bytes | None) -> bool:
        """Whether a mark found in the kernel was made by this store."""
        return mark is not None and len(mark) == 16 and mark.startswith(self.prefix)

    # ------------------------------------------------------------ entries

    def remember(self, binding: Binding, ifindex: int | None = None) -> bytes:
        """Name a binding's mark; a mirror's device index too (observe dumps that device's hook)."""
        mark = self.mark_of(binding)
        self.bindings[mark.hex()] = dict(_to_dict(binding), ifindex=ifindex)
        self._hooks = None
        return mark

    def mirror_hooks(self) -> dict[tuple[int, str], dict[bytes, Binding]]:
        """{(ifindex, hook): {mark: binding}} of the mirrors named here."""
        if self._hooks is None:
            hooks: dict = {}
            for mark, data in self.bindings.items():
                spec = dict(data["spec"])
                if spec.get("type") == "mirror" and data.get("ifindex"):
                    hooks.setdefault((data["ifindex"], spec["hook"]), {})[bytes.fromhex(mark)] = _from_dict(data)
            self._hooks = hooks
        return self._hooks

    def entries(self):
        """(mark, binding, device ifindex or None) of everything named here."""
        for mark, data in list(self.bindings.items()):
            yield bytes.fromhex(mark), _from_dict(data), data.get("ifindex")

    def marks(self) -> set[bytes]:
        return {bytes.fromhex(mark) for mark in self.bindings}

    def forget(self, mark: bytes) -> None:
        self.bindings.pop(mark.hex(), None)
        self._hooks = None

    def binding(self, mark: bytes) -> Binding | None:
        data = self.bindings.get(mark.hex())
        return _from_dict(data) if data else None
