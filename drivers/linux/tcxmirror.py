"""Mirror bindings on the tcx hook (datapath=tcx): one eBPF program per mirror filters and clones.

Used by TcDataplane (dataplane.py) for a binding whose spec carries
("datapath", "tcx"); everything else stays on clsact + cls_bpf + mirred.

In the kernel, per binding: the program tcxprog.load_mirror() made (target
ifindex and direction fixed in it, counters in its own per-CPU map), a tcx
link on the device's hook, and that link pinned in bpffs at

    /sys/fs/bpf/vtap/<host | ns-NAME>/<mark hex>-<target ifindex>

The pin is what keeps the mirror in place after vtap exits, and all observe
needs: one listdir gives every mirror's mark (which names the state dir, as a
cls_bpf cookie does) and the target ifindex the program copies to (to tell a
recreated target, whose new ifindex the program does not know); the link gives
device and hook (ifindex 0 once the device is gone), its program the map.

bpf(2) resolves ifindexes in the calling thread's network namespace: every call
here runs inside the dataplane's namespace (in_netns).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from contextlib import contextmanager
from typing import NamedTuple

from vtap_core.errors import ValidationError
from vtap_drivers.linux import bpfsys, tcxprog

PIN_ROOT = os.path.join(bpfsys.BPFFS, "vtap")
DATAPATHS = ("tc", "tcx")
HOOK_OF_ATTACH = {value: name for name, value in bpfsys.TCX_HOOKS.items()}
log = logging.getLogger("vtap.tcx")
_said: set = set()  # fallback reasons already logged by this process
_supported: list = []  # [bool] once known: the kernel does not change under a process


def check_datapath(value) -> str:
    """The datapath setting: "tc" (default) or "tcx"; ValidationError naming both otherwise."""
    value = value or "tc"
    if value not in DATAPATHS:
        raise ValidationError("datapath", f"{value!r} is not a data path; write tc (clsact + cls_bpf + mirred, the default) or tcx (one eBPF program on the tcx hook, Linux >= 6.6)")
    return value


def say_once(why: str) -> None:
    """Log a fallback reason once per process (plans run every few seconds in a follower)."""
    if why not in _said:
        _said.add(why)
        log.warning("datapath tcx: %s; using clsact + cls_bpf + mirred there", why)


def kernel_has_tcx() -> bool:
    if not _supported:
        _supported.append(bpfsys.tcx_supported())
    return _supported[0]


def why_not(program) -> str | None:
    """Why a mirror with this classic program cannot go on tcx (None: it can). Others' qdiscs do not
    matter: the tcx hook runs before them."""
    if not kernel_has_tcx():
        return f"this kernel ({os.uname().release}) has no tcx hook (Linux >= 6.6)"
    if not pins_outlive_the_process():
        return f"no bpffs at {bpfsys.BPFFS} in this mount namespace (as under `ip netns exec`): pins made here would vanish with this process"
    try:
        tcxprog.translate(program, 0, 1)  # the map fd and ifindex are only constants in it
    except tcxprog.Untranslatable as exc:
        return f"the filter cannot be translated to eBPF ({exc})"
    return None


def pins_outlive_the_process() -> bool:
    """Whether a pin made now stays after vtap exits: bpffs is mounted already, or
    this is the host's mount namespace (where vtap mounts it for good)."""
    if bpfsys._is_bpffs(bpfsys.BPFFS):
        return True
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return False


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(netns: str | None):
    """Run the body in the named network namespace (this thread only), then come back."""
    if not netns:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def pin_dir(netns: str | None) -> str:
    return os.path.join(PIN_ROOT, f"ns-{netns}" if netns else "host")


def _private_dir(path: str) -> None:
    """path and PIN_ROOT as real directories (no symlink anywhere below bpffs), 0700."""
    bpfsys.ensure_bpffs()
    for part in (PIN_ROOT, path):
        try:
            os.mkdir(part, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(part)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{part} is not a directory of this user's; vtap pins nothing through it")
        if info.st_mode & 0o077:
            os.chmod(part, 0o700)


class Pinned(NamedTuple):
    """One of vtap's tcx mirrors as its pin shows it."""

    mark: bytes
    to_index: int  # the target the program copies to
    path: str


def pins(netns: str | None, owns) -> list[Pinned]:
    """The pins of marks `owns` accepts (this state dir's), from one listdir."""
    directory = pin_dir(netns)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        head, _, tail = name.partition("-")
        try:
            mark, to_index = bytes.fromhex(head), int(tail)
        except ValueError:
            continue
        if owns(mark):
            out.append(Pinned(mark, to_index, os.path.join(directory, name)))
    return out


class Found(NamedTuple):
    ifindex: int  # 0: the device is gone (the link is defunct)
    hook: str | None
    counters: dict


def read(pinned: Pinned) -> Found | None:
    """Device, hook and counters of a pinned mirror (None if the pin went away meanwhile)."""
    try:
        with bpfsys.get_pinned(pinned.path) as link:
            info = bpfsys.link_info(link)
        if not info.ifindex:
            return Found(0, None, {})
        with bpfsys.prog_by_id(info.prog_id) as prog:
            map_ids = bpfsys.prog_info(prog).map_ids
        with bpfsys.map_by_id(map_ids[0]) as counters:
            figures = tcxprog.read_counters(counters)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return Found(info.ifindex, HOOK_OF_ATTACH.get(info.attach_type), figures)


def attach(netns: str | None, mark: bytes, program, ifindex: int, hook: str, to_index: int, present: list[Pinned], to_ingress: bool = False, ring: tcxprog.RingAction | None = None) -> None:
    """Load, attach on the device's hook, pin. present: the pins of this mark (pins());
    one that is not this very mirror (another target ifindex, a defunct link) is replaced.
    ring: write matches into that BPF ring buffer (a pcap sink's, bpfring.py) instead of cloning."""
    directory = pin_dir(netns)
    _private_dir(directory)
    path = os.path.join(directory, f"{mark.hex()}-{to_index}")
    for old in present:
        found = read(old)
        if old.path == path and found is not None and found.ifindex == ifindex and found.hook == hook:
            return  # in place already
        detach(old.path)
    with tcxprog.load_mirror(program, to_index, mark.hex()[-10:], to_ingress, ring) as mirror:
        link = bpfsys.attach_tcx(mirror.prog, ifindex, hook)
        with link:
            try:
                bpfsys.pin(link, path)
            except BaseException:
                bpfsys.detach_link(link)
                raise


def detach(path: str) -> None:
    """Take the pinned link off its hook and drop the pin: the program and map go with it."""
    try:
        with bpfsys.get_pinned(path) as link:
            try:
                bpfsys.detach_link(link)
            except OSError as exc:
                if exc.errno not in (errno.ENOLINK, errno.ENOENT, errno.EINVAL):  # defunct already
                    raise
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_marks(netns: str | None, marks: set) -> None:
    for pinned in pins(netns, lambda mark: mark in marks):
        detach(pinned.path)
