"""Ring-writing mirrors on the default tc data path: a direct-action cls_bpf filter, no clone.

On datapath=tc a mirror to a pcap sink that has a BPF ring (bpfring.py) is, instead of
cls_bpf (classic) + mirred to the ifb sink, one cls_bpf filter in direct-action mode
running the flow's filter as tcxprog translates it with a RingAction: a match is written
into the sink's ring (what the capture reads), and the program returns TC_ACT_UNSPEC,
so the next filter on the hook still runs. Same place, priority and handle as the
classic filter would have. A direct-action filter runs no actions, so the mark is the
filter's name (tcnl.ring_filter_name); its counters are in the program's first map.

Each writer's program is also pinned beside the sink's ring, at <pin dir>/prog-<mark hex>:
one listdir finds the writers whose mark no catalog names (orphans: no action dump lists
them), and the capture process finds there the writers of its ring (their ring-full
counts: bpfring.WriterDrops).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from vtap_drivers.linux import bpfring, bpfsys, tcxprog

log = logging.getLogger("vtap.tc")
_said: set = set()
_ringbuf: list = []  # [bool] once known


def say_once(why: str) -> None:
    """Log why pcap mirrors clone on this machine, once per process."""
    if why not in _said:
        _said.add(why)
        log.warning("pcap sinks: %s; mirrors to them use cls_bpf + mirred (a clone per frame)", why)


def kernel_has_ringbuf() -> bool:
    """Whether this kernel makes BPF ring buffers (Linux >= 5.8): one small ring made and dropped, once."""
    if not _ringbuf:
        try:
            bpfring.create("vtap_probe", bpfring.PAGE).close()
            _ringbuf.append(True)
        except OSError as exc:
            _ringbuf.append(False)
            say_once(f"this kernel ({os.uname().release}) makes no BPF ring buffer ({exc.strerror or exc}; Linux >= 5.8)")
    return _ringbuf[0]


def translates(program, snaplen: int | None) -> bool:
    """Whether tcxprog writes a ring writer for this classic program (fds and ifindex are constants in it)."""
    try:
        tcxprog.translate(program, 0, 1, ring=tcxprog.RingAction(0, snaplen, bpfring.DIRECTION_IN))
    except tcxprog.Untranslatable as exc:
        say_once(f"a filter cannot be translated to eBPF ({exc})")
        return False
    return True


class Program(NamedTuple):
    counters: dict  # tcxprog.COUNTERS: packets, bytes, clone_failures (= ring full)
    maps: tuple  # map ids: counters first, then the ring it writes into


def read(prog_id: int) -> Program | None:
    """The counters and maps of a ring filter's program (None when it is gone meanwhile)."""
    try:
        with bpfsys.prog_by_id(prog_id) as prog:
            maps = bpfsys.prog_info(prog).map_ids
        with bpfsys.map_by_id(maps[0]) as counters:
            return Program(tcxprog.read_counters(counters), tuple(maps))
    except (OSError, IndexError):
        return None


def pin_path(pin_dir: str, mark: bytes) -> str:
    return os.path.join(pin_dir, bpfring.WRITER_PREFIX + mark.hex())


def pin(prog: bpfsys.BpfFd, pin_dir: str, mark: bytes) -> None:
    """Pin a writer's program (0600), replacing an older program of this mark."""
    path = pin_path(pin_dir, mark)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    bpfsys.pin(prog, path)
    os.chmod(path, 0o600)


def pinned_marks(pin_dir: str, owns) -> list[bytes]:
    """The marks of the writers pinned in pin_dir that `owns` accepts (one listdir)."""
    try:
        names = os.listdir(pin_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        if name.startswith(bpfring.WRITER_PREFIX):
            try:
                mark = bytes.fromhex(name[len(bpfring.WRITER_PREFIX):])
            except ValueError:
                continue
            if owns(mark):
                out.append(mark)
    return out


def unpin(pin_dir: str, marks: set) -> None:
    """Drop the pins of these marks' writers (their filters hold the programs while they exist)."""
    for mark in pinned_marks(pin_dir, marks.__contains__):
        try:
            os.unlink(pin_path(pin_dir, mark))
        except FileNotFoundError:
            pass
