"""What vtap put in one network namespace: mark -> binding, and the clsact qdiscs it added.

The kernel holds only a 16-byte mark (a tc action cookie, a device alias);
the catalog maps each mark back to the Binding (key and spec) it stands for,
so observe() can return what plan() returned. It is written before anything
is put in the kernel, so whatever a killed process left is still named here.
A command names everything it will add first (TcDataplane.prepare), so a full
disk fails it before the kernel is touched; saving unchanged content writes
nothing, and a file naming more than the kernel holds is always safe.

One JSON file per namespace in the state dir. The same file's flock also
serializes apply/remove between vtap processes (a CLI command and a follower).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager

from vtap_core.driver import Binding
from vtap_core.errors import OperationFailed
from vtap_core.safefile import open_private, private_dirs, write_private

MARK_PREFIX = "vtap:"  # device aliases: "vtap:<32 hex digits>"
MARK_MAGIC = b"vt"  # a mark: MARK_MAGIC, 2 bytes naming the state dir, 12 bytes of digest
GENERATION_HEAD = '{"generation": "'
GENERATION_LENGTH = 16
MARKS_REMEMBERED = 100_000
log = logging.getLogger("vtap.catalog")


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
        "spec": binding.spec,  # a tuple of pairs, shared with the binding; JSON writes it as lists
        "order": binding.order,
    }


def _from_dict(data: dict) -> Binding:
    return Binding(
        key=data["key"],
        session=data["session"],
        flow=data.get("flow"),
        vm=data.get("vm"),
        spec=data["spec"] if isinstance(data["spec"], tuple) else tuple(map(tuple, data["spec"])),  # _compact() made most tuples already
        order=data.get("order", 1),
    )


def binding_of(entry: dict, counters=None) -> Binding:
    """The Binding of an entry of mirrors(), with the counters observe read (_from_dict, positionally: 20,000 a status)."""
    spec = entry["spec"]
    spec = spec if isinstance(spec, tuple) else tuple(map(tuple, spec))
    return Binding(entry["key"], entry["session"], entry.get("flow"), entry.get("vm"), spec, counters, entry.get("order", 1))


def _compact(bindings: dict) -> dict:
    """The entries, each spec a tuple of shared pairs: JSON gives every entry its own copy of
    ["type", "mirror"], ["to", "mon0"]..., which for 20,000 mirrors is tens of MiB."""
    pairs: dict = {}
    for data in bindings.values():
        spec = data.get("spec") if isinstance(data, dict) else None
        if isinstance(spec, list):
            try:
                data["spec"] = tuple([pairs.setdefault(pair, pair) for pair in map(tuple, spec)])
            except TypeError:  # a value that cannot be hashed: keep the entry as it came
                pass
    return bindings


class Catalog:
    """Marks and qdiscs of one namespace, in STATE_DIR/tc-<netns or host>.json."""

    def __init__(self, state_dir: str, netns: str | None):
        private_dirs(state_dir)  # the catalog names every device, filter and flow: 0600 in a 0700 folder
        self.path = os.path.join(state_dir, f"tc-{netns or 'host'}.json")
        self.prefix = store_prefix(state_dir)
        self.bindings: dict[str, dict] = {}  # mark hex -> binding dict
        self.qdiscs: dict[str, int] = {}  # device name -> ifindex of a clsact vtap added
        self.failures: dict[str, list] = {}  # binding key -> [session, flow, why] of its last failed apply
        self._generation = None  # of the file as last read or written
        self._changed = False  # bindings differ from the file's
        self._saved_qdiscs: dict[str, int] = {}  # qdiscs as the file has them
        self._hooks = None  # mirrors(), computed once per content
        self._marks: dict = {}  # (key, session, flow, vm, spec) -> mark: apply asks per binding, twice

    # ------------------------------------------------------------ file

    def load(self) -> "Catalog":
        """Read the file, unless memory holds what it holds (its generation; observe runs often)."""
        try:
            with open(self.path) as f:
                head = f.read(len(GENERATION_HEAD) + GENERATION_LENGTH)
                if self._generation and head == GENERATION_HEAD + self._generation:
                    return self
                f.seek(0)
                # The old content goes before the new is read: never both in memory at once.
                self.bindings, self._hooks, self._generation = {}, None, None
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except json.JSONDecodeError as exc:
            raise OperationFailed(f"{self.path} is not a vtap catalog ({exc}); move it away to start afresh") from None
        self.bindings = _compact(data.get("bindings", {}))
        self.qdiscs = data.get("qdiscs", {})
        self.failures = data.get("failures", {})
        self._generation = data.get("generation")
        self._changed, self._saved_qdiscs = False, dict(self.qdiscs)
        self._hooks = None
        return self

    def save(self) -> None:
        """Write the file if its content changed; a failed write leaves the old file and no temporary."""
        if not self._changed and self.qdiscs == self._saved_qdiscs:
            return
        generation = os.urandom(GENERATION_LENGTH // 2).hex()
        # The generation first, so load() can tell an unchanged file from its first bytes.
        write_private(self.path, json.dumps({"generation": generation, "bindings": self.bindings, "qdiscs": self.qdiscs, "failures": self.failures}))
        self._generation = generation
        self._changed, self._saved_qdiscs = False, dict(self.qdiscs)

    def save_or_keep(self) -> None:
        """save(), after the kernel lost things: if the write fails, the old file names more, which is safe."""
        try:
            self.save()
        except OSError as exc:
            self._generation = None  # memory differs from the file: read it again next time
            log.warning("%s: kept as it was (%s); it still names mirrors already removed", self.path, exc.strerror or exc)

    @contextmanager
    def locked(self, shared: bool = False):
        """This namespace's catalog, read fresh, with vtap's changes in the namespace held still.

        apply/remove take it exclusively; observe shared, so it never reads the
        kernel half way through another process's apply (and takes that one's
        new mirrors for orphans).
        """
        fd = self._open_lock(shared)
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self.load()
            yield self
        except BaseException:
            self._generation = None  # memory may hold changes the file does not: read it again next time
            raise
        finally:
            if fd is not None:
                os.close(fd)

    def _open_lock(self, shared: bool) -> int | None:
        try:
            return open_private(self.path + ".lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if not shared or exc.errno not in (errno.EROFS, errno.EACCES):
                raise
        # A read-only state dir (status of a read-only store): nobody can change the catalog, so reading needs no lock.
        try:
            return open_private(self.path + ".lock", os.O_RDONLY)
        except OSError:
            return None

    # ------------------------------------------------------------ marks

    def mark_of(self, binding: Binding) -> bytes:
        """The 16 bytes this store puts in the kernel for a binding."""
        named = (binding.key, binding.session, binding.flow, binding.vm, binding.spec)
        try:
            mark = self._marks.get(named)
        except TypeError:  # a spec value that cannot be hashed: just compute it
            return self.prefix + digest_of(binding)
        if mark is None:
            if len(self._marks) > MARKS_REMEMBERED:
                self._marks.clear()
            mark = self._marks[named] = self.prefix + digest_of(binding)
        return mark

    def alias_of(self, binding: Binding) -> str:
        return MARK_PREFIX + self.mark_of(binding).hex()

    def owns(self, mark: bytes | None) -> bool:
        """Whether a mark found in the kernel was made by this store."""
        return mark is not None and len(mark) == 16 and mark.startswith(self.prefix)

    # ------------------------------------------------------------ entries

    def remember(self, binding: Binding, ifindex: int | None = None) -> bytes:
        """Name a binding's mark; a mirror's device index too (observe dumps that device's hook)."""
        mark = self.mark_of(binding)
        known = self.bindings.get(mark.hex())
        # The mark is a digest of key and spec: an entry under it with this ifindex and order is this one.
        if known is not None and known.get("ifindex") == ifindex and known.get("order") == binding.order:
            return mark
        entry = dict(_to_dict(binding), ifindex=ifindex)
        if known != entry:
            self.bindings[mark.hex()] = entry
            self._changed, self._hooks = True, None
        return mark

    def mirrors(self) -> dict[bytes, tuple[int, str, str | None, dict]]:
        """{mark: (device ifindex, hook, parent, entry)} of the cls_bpf mirrors named here (binding_of(entry) is its Binding:
        observe makes it once, with its counters)."""
        if self._hooks is None:
            found: dict = {}
            for mark, data in self.bindings.items():
                spec = dict(data["spec"])
                if spec.get("type") == "mirror" and data.get("ifindex") and spec.get("datapath") != "tcx":  # tcx: pins, not filters
                    found[bytes.fromhex(mark)] = (data["ifindex"], spec["hook"], spec.get("parent"), data)
            self._hooks = found
        return self._hooks

    def entries(self):
        """(mark, binding, device ifindex or None) of everything named here."""
        for mark, data in list(self.bindings.items()):
            yield bytes.fromhex(mark), _from_dict(data), data.get("ifindex")

    def marks(self) -> set[bytes]:
        return {bytes.fromhex(mark) for mark in self.bindings}

    def note_failure(self, bindings, why: str) -> None:
        """These bindings' apply failed: say why in status until one of them applies."""
        for binding in bindings:
            self.failures[binding.key] = [binding.session, binding.flow, why]
            self._changed = True

    def clear_failures(self, bindings) -> None:
        for binding in bindings:
            if self.failures.pop(binding.key, None) is not None:
                self._changed = True

    def forget(self, mark: bytes) -> None:
        if self.bindings.pop(mark.hex(), None) is not None:
            self._changed, self._hooks = True, None

    def binding(self, mark: bytes) -> Binding | None:
        data = self.bindings.get(mark.hex())
        return _from_dict(data) if data else None
