"""The bpf(2) system call, through ctypes: just what vtap's tcx data path needs.

Programs (SCHED_CLS), per-CPU array maps, tcx links (Linux >= 6.6), pins in
bpffs, queries of a device's tcx hook and object info. Every kernel object is
handed out as a BpfFd, a context manager that closes its fd: a program or map
lives on only while an fd, a pin or a link holds it, so a leaked fd is a leaked
kernel object.

Layouts follow union bpf_attr and the info structs of include/uapi/linux/bpf.h;
fields a newer kernel appended are zero here, which the kernel accepts.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from typing import NamedTuple

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

# Commands (enum bpf_cmd).
MAP_CREATE, MAP_LOOKUP_ELEM = 0, 1
PROG_LOAD, OBJ_PIN, OBJ_GET = 5, 6, 7
PROG_TEST_RUN = 10
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 14, 15, 16
LINK_CREATE, LINK_GET_FD_BY_ID, LINK_DETACH = 28, 30, 34

PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_SCHED_ACT = 4  # tc action "bpf" (act_bpf)
MAP_TYPE_PERCPU_ARRAY = 6
TCX_INGRESS, TCX_EGRESS = 46, 47  # enum bpf_attach_type, Linux 6.6+
TCX_HOOKS = {"ingress": TCX_INGRESS, "egress": TCX_EGRESS}
LINK_TYPE_TCX = 11

ATTR_SIZE = 144  # bytes of union bpf_attr we pass; the kernel checks that the tail is zero
LOG_SIZE = 1 << 20
OBJ_NAME_LEN = 16
BPFFS = "/sys/fs/bpf"
BPF_FS_MAGIC = 0xCAFE4A11
ENOTSUPP = 524  # the kernel's internal "not supported", which bpf(2) can leak


class TcxUnsupported(OSError):
    """This kernel has no tcx hook (older than 6.6): the caller falls back to clsact."""


class BpfFd:
    """An fd of a bpf object, closed on exit from a with block, by close(), or when garbage-collected.

    So a link nobody pinned detaches once its BpfFd is gone: pin what must outlive the process.
    """

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("bpf fd already closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def bpf(command: int, attr: bytes | ctypes.Array) -> tuple[int, ctypes.Array]:
    """(result, the attr buffer as the kernel left it); OSError naming the command on failure."""
    buffer = attr if isinstance(attr, ctypes.Array) else ctypes.create_string_buffer(attr, ATTR_SIZE)
    result = _libc.syscall(SYS_BPF, command, buffer, ctypes.sizeof(buffer))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"bpf command {command}: {os.strerror(error)}")
    return result, buffer


def _address(buffer) -> int:
    return ctypes.addressof(buffer) if buffer is not None else 0


# ---------------------------------------------------------------- programs

LOAD_ATTEMPTS = 5


def load_program(instructions: bytes, name: str, license: str = "Apache-2.0", prog_type: int = PROG_TYPE_SCHED_CLS) -> BpfFd:
    """Load a SCHED_CLS (or prog_type) program; the verifier's log is in the OSError when it refuses.

    Loaded without a log first (as libbpf does): a log buffer makes every load about 5x
    slower (bench/results/tcx_attach.txt), and only a refusal needs one, so a refused
    program is loaded once more with the log to say why.
    """
    try:
        return BpfFd(_load(instructions, name, license, None, prog_type))
    except OSError as error:
        log = ctypes.create_string_buffer(LOG_SIZE)
        try:
            return BpfFd(_load(instructions, name, license, log, prog_type))
        except OSError:
            verifier = log.value.decode(errors="replace").strip()
            raise OSError(error.errno, f"program load refused: {os.strerror(error.errno)}" + (f"; verifier: {verifier[-3000:]}" if verifier else "")) from None


def _load(instructions: bytes, name: str, license: str, log, prog_type: int = PROG_TYPE_SCHED_CLS) -> int:
    insns = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(license.encode())
    level, size, address = (1, len(log), _address(log)) if log is not None else (0, 0, 0)
    attr = struct.pack(
        "=IIQQIIQII16s", prog_type, len(instructions) // 8, _address(insns), _address(license_text),
        level, size, address, 0, 0, _object_name(name),
    )
    for attempt in range(LOAD_ATTEMPTS):
        try:
            return bpf(PROG_LOAD, attr)[0]
        except OSError as error:
            # The verifier gives up with EAGAIN when a signal is pending (SIGCHLD, a SIGSTOP/SIGCONT): try again, as libbpf does.
            if error.errno != errno.EAGAIN or attempt + 1 == LOAD_ATTEMPTS:
                raise


def _object_name(name: str) -> bytes:
    """Kernel object names: at most 15 characters of [A-Za-z0-9_.], NUL-terminated."""
    encoded = name.encode()
    if len(encoded) >= OBJ_NAME_LEN or not all(chr(c).isalnum() or chr(c) in "_." for c in encoded):
        raise ValueError(f"bpf object name {name!r}: at most {OBJ_NAME_LEN - 1} characters of letters, digits, '_' and '.'")
    return encoded


class RunResult(NamedTuple):
    retval: int
    data_out: bytes


def run_on_frame(prog: BpfFd, frame: bytes) -> RunResult:
    """Run the program once on a frame (BPF_PROG_TEST_RUN): its return value and the frame after."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = struct.pack("=IIIIQQII", prog.fileno(), 0, len(frame), len(data_out), _address(data_in), _address(data_out), 1, 0)
    _, buffer = bpf(PROG_TEST_RUN, attr)
    retval, _, size_out = struct.unpack_from("=III", buffer.raw, 4)
    return RunResult(ctypes.c_int32(retval).value, data_out.raw[:size_out])


# ---------------------------------------------------------------- maps

def create_percpu_array(name: str, value_size: int, entries: int = 1) -> BpfFd:
    """A per-CPU array map with u32 keys: counters each CPU bumps without atomics."""
    attr = struct.pack("=IIIIIII16s", MAP_TYPE_PERCPU_ARRAY, 4, value_size, entries, 0, 0, 0, _object_name(name))
    fd, _ = bpf(MAP_CREATE, attr)
    return BpfFd(fd)


@functools.cache
def possible_cpus() -> int:
    """How many values a per-CPU map lookup returns: one per possible CPU, not per online one
    (fixed at boot: read once, not per counter read)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def read_percpu_u64(map_fd: BpfFd, key: int, fields: int) -> list[int]:
    """The `fields` u64 counters of one per-CPU array entry, summed over every possible CPU."""
    cpus = possible_cpus()
    stride = fields * 8  # each CPU's value, u64 fields: already 8-byte aligned
    key_buffer = ctypes.create_string_buffer(struct.pack("=I", key), 4)
    values = ctypes.create_string_buffer(stride * cpus)
    bpf(MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", map_fd.fileno(), 0, _address(key_buffer), _address(values), 0))
    totals = [0] * fields
    for cpu in range(cpus):
        for field, value in enumerate(struct.unpack_from(f"={fields}Q", values.raw, cpu * stride)):
            totals[field] += value
    return totals


# ---------------------------------------------------------------- tcx links

def attach_tcx(prog: BpfFd, ifindex: int, hook: str) -> BpfFd:
    """A tcx link running prog on ifindex's hook ("ingress"/"egress"), after those already there.

    Closing the link's fd detaches it unless it was pinned. TcxUnsupported when
    this kernel has no tcx hook.
    """
    attr = struct.pack("=IIII", prog.fileno(), ifindex, TCX_HOOKS[hook], 0)
    try:
        fd, _ = bpf(LINK_CREATE, attr)
    except OSError as error:
        if error.errno in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP) and not tcx_supported():
            raise TcxUnsupported(error.errno, f"this kernel has no tcx hook ({os.uname().release}): use clsact") from None
        raise
    return BpfFd(fd)


def tcx_supported() -> bool:
    """Whether the kernel knows the tcx attach type: a query of loopback's tcx hook says so."""
    try:
        query_tcx(1, "ingress")
    except OSError:
        return False
    return True


def detach_link(link: BpfFd) -> None:
    """Take a link off its hook now, even while pins or other fds still hold it."""
    bpf(LINK_DETACH, struct.pack("=I", link.fileno()))


class TcxQuery(NamedTuple):
    prog_ids: tuple
    link_ids: tuple  # link_ids[i] runs prog_ids[i]; 0 for a program attached without a link
    revision: int


def query_tcx(ifindex: int, hook: str, capacity: int = 64) -> TcxQuery:
    """The programs on a device's tcx hook, in the order they run, with their links."""
    while True:
        prog_ids = (ctypes.c_uint32 * capacity)()
        link_ids = (ctypes.c_uint32 * capacity)()
        attr = struct.pack("=IIIIQIIQQQQ", ifindex, TCX_HOOKS[hook], 0, 0, _address(prog_ids), capacity, 0, 0, _address(link_ids), 0, 0)
        buffer = ctypes.create_string_buffer(attr, ATTR_SIZE)
        try:
            bpf(PROG_QUERY, buffer)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            capacity = struct.unpack_from("=I", buffer.raw, 24)[0]  # ENOSPC: the kernel wrote the real count
            continue
        count = struct.unpack_from("=I", buffer.raw, 24)[0]
        revision = struct.unpack_from("=Q", buffer.raw, 56)[0]
        return TcxQuery(tuple(prog_ids[:count]), tuple(link_ids[:count]), revision)


# ---------------------------------------------------------------- ids, info

def prog_by_id(prog_id: int) -> BpfFd:
    return BpfFd(bpf(PROG_GET_FD_BY_ID, struct.pack("=I", prog_id))[0])


def map_by_id(map_id: int) -> BpfFd:
    return BpfFd(bpf(MAP_GET_FD_BY_ID, struct.pack("=I", map_id))[0])


def link_by_id(link_id: int) -> BpfFd:
    return BpfFd(bpf(LINK_GET_FD_BY_ID, struct.pack("=I", link_id))[0])


def _info(obj: BpfFd, size: int) -> bytes:
    info = ctypes.create_string_buffer(size)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", obj.fileno(), size, _address(info)))
    return info.raw


class ProgInfo(NamedTuple):
    id: int
    type: int
    tag: str
    name: str
    map_ids: tuple


def prog_info(prog: BpfFd, max_maps: int = 16) -> ProgInfo:
    """id, type, tag (hash of the instructions), name and maps of a program."""
    map_ids = (ctypes.c_uint32 * max_maps)()
    info = ctypes.create_string_buffer(struct.pack("=52xIQ", max_maps, _address(map_ids)), 256)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", prog.fileno(), 256, _address(info)))
    kind, prog_id, tag = struct.unpack_from("=II8s", info.raw, 0)
    nr_maps = min(struct.unpack_from("=I", info.raw, 52)[0], max_maps)
    name = struct.unpack_from("16s", info.raw, 64)[0].split(b"\0")[0].decode()
    return ProgInfo(prog_id, kind, tag.hex(), name, tuple(map_ids[:nr_maps]))


class LinkInfo(NamedTuple):
    id: int
    type: int
    prog_id: int
    ifindex: int
    attach_type: int


def link_info(link: BpfFd) -> LinkInfo:
    """id, type, program and (for a tcx link) the device and hook it sits on; ifindex 0 once detached."""
    raw = _info(link, 64)
    kind, link_id, prog_id = struct.unpack_from("=III", raw, 0)
    ifindex, attach_type = struct.unpack_from("=II", raw, 16)
    return LinkInfo(link_id, kind, prog_id, ifindex, attach_type)


class MapInfo(NamedTuple):
    type: int
    id: int
    max_entries: int


def map_info(obj: BpfFd) -> MapInfo:
    """type, id and max_entries (a ring buffer's size in bytes) of a map; OSError when obj is no map."""
    kind, map_id, _key_size, _value_size, max_entries = struct.unpack_from("=IIIII", _info(obj, 80), 0)
    return MapInfo(kind, map_id, max_entries)


# ---------------------------------------------------------------- bpffs pins

def ensure_bpffs(path: str = BPFFS) -> None:
    """Mount bpffs at path unless one is there already (mount(2), not a subprocess)."""
    if _is_bpffs(path):
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0700") != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount bpffs at {path}: {os.strerror(error)}")


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def _is_bpffs(path: str) -> bool:
    result = _StatFs()
    if _libc.statfs(path.encode(), ctypes.byref(result)) != 0:
        return False
    return result.f_type & 0xFFFFFFFF == BPF_FS_MAGIC


def pin(obj: BpfFd, path: str) -> None:
    """Keep the object alive at path in bpffs after every fd closes (EEXIST if path is taken)."""
    name = ctypes.create_string_buffer(path.encode())
    bpf(OBJ_PIN, struct.pack("=QII", _address(name), obj.fileno(), 0))


def get_pinned(path: str) -> BpfFd:
    """An fd of the object pinned at path."""
    name = ctypes.create_string_buffer(path.encode())
    return BpfFd(bpf(OBJ_GET, struct.pack("=QII", _address(name), 0, 0))[0])
