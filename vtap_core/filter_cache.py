"""Compiled filter programs kept in the state dir, so an expression is compiled once, not per process.

Every plan (apply, status, a follower's resync) needs the program of every
flow's expression; libpcap needs a live handle for that (filters.py says
why), which is the slow part. STATE_DIR/filter-programs.json maps a key to
the program compiled for it. The key holds everything the program depends on:
libpcap's version, the link type, whether the handle was live (VLAN metadata
handling), the snap length and the whole expression as compiled (a session's
tunnel guard is part of it). Sampling is not: with_sampling() is applied to
the cached program afterwards, a pure function of program and N.

The file is root's and private: written 0600 through a fresh temporary file
and rename, read only when it is a regular file of ours (O_NOFOLLOW, owner,
mode). A program is stored as the hex of its struct sock_filter array, with
a digest of key and program; an entry that fails the digest, or is not a
well-formed program, is ignored and compiled again (and rewritten on save).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

from vtap_core import filters

FILE_NAME = "filter-programs.json"
MAX_ENTRIES = 50_000  # beyond this, a save keeps only what this process used
INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter
BPF_RET_CLASS = 0x06


def _key(expression: str, live: bool) -> str:
    handle = "live-linux-vlan" if live else "dead"
    return f"{filters.libpcap_version()}|dlt {filters.DLT_EN10MB}|{handle}|snaplen {filters.SNAPLEN}|{expression}"


def _digest(key: str, program: str) -> str:
    return hashlib.sha256(f"{key}\n{program}".encode()).hexdigest()


def _encoded(program) -> str:
    return b"".join(INSTRUCTION.pack(*insn) for insn in program).hex()


def _decoded(text) -> tuple | None:
    """The instructions in a stored program, or None unless 1..BPF_MAXINSNS of them ending in a return."""
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        return None
    if not raw or len(raw) % INSTRUCTION.size or len(raw) > filters.BPF_MAXINSNS * INSTRUCTION.size:
        return None
    program = tuple(filters.Instruction(*insn) for insn in INSTRUCTION.iter_unpack(raw))
    return program if program[-1].code & 0x07 == BPF_RET_CLASS else None


class FilterCache:
    """Programs by (expression, live) in STATE_DIR/filter-programs.json; see the module docstring."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, FILE_NAME)
        self._entries: dict | None = None  # name -> {"key", "program", "digest"} as read
        self._fresh: dict = {}  # name -> entry compiled here, not saved yet
        self._used: set = set()
        self._verified: dict = {}  # key -> Program

    def get(self, expression: str, live: bool):
        """The cached program (a tuple of Instructions), or None: compile it."""
        key = _key(expression, live)
        if key in self._verified:
            return self._verified[key]
        name = hashlib.sha256(key.encode()).hexdigest()
        entry = self._fresh.get(name) or self._read().get(name)
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        text = entry.get("program")
        program = _decoded(text) if entry.get("digest") == _digest(key, str(text)) else None
        if program is None:
            return None  # damaged: compile again (and overwrite it on save)
        self._used.add(name)
        self._verified[key] = program
        return program

    def put(self, expression: str, live: bool, program) -> None:
        key = _key(expression, live)
        text = _encoded(program)
        name = hashlib.sha256(key.encode()).hexdigest()
        self._fresh[name] = {"key": key, "program": text, "digest": _digest(key, text)}
        self._used.add(name)
        self._verified[key] = tuple(program)

    def save(self) -> None:
        """Write what was compiled here, merged with what the file holds now (other processes')."""
        if not self._fresh:
            return
        self._entries = None
        entries = dict(self._read())
        entries.update(self._fresh)
        if len(entries) > MAX_ENTRIES:
            entries = {name: entry for name, entry in entries.items() if name in self._used}
        temporary = f"{self.path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(entries, separators=(",", ":")))
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.lexists(temporary):
                os.unlink(temporary)
            raise
        self._entries = entries
        self._fresh = {}

    def _read(self) -> dict:
        """The file's entries; {} when it is missing, unreadable, not ours, or not JSON."""
        if self._entries is None:
            self._entries = {}
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return self._entries  # missing, or a symlink (ELOOP): nothing to trust
            with os.fdopen(fd) as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
                    return self._entries
                try:
                    data = json.loads(f.read())
                except (ValueError, UnicodeDecodeError):
                    return self._entries
            if isinstance(data, dict):
                self._entries = data
        return self._entries
