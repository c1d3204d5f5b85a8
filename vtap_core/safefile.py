"""Files vtap writes as root: private, never through another user's symlink, never onto their file.

Two kinds of files:

* vtap's own runtime files (store, catalog, lock, log, pid files) live in its
  state dir: open_private() creates them 0600, refuses a symlink in their
  place and a file somebody else owns. private_dirs() creates missing folders 0700.
* Capture files (`pcap:PATH` targets, `vtap capture -w`) may be anywhere the
  user says, including world-writable folders like /tmp. check_capture_path()
  says whether vtap may write there, before anything else happens, and
  open_capture() opens it without following a symlink planted since.

Trusted owners are root and the user vtap runs as; nobody else's symlink is
followed in a folder they could change, and nobody else's file is written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from vtap_core.errors import OperationFailed, ValidationError

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # the first four bytes of every pcapng file (Section Header Block)
MAX_SYMLINKS = 40  # as the kernel's own limit on links followed while resolving a path


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def private_dirs(path: str) -> str:
    """Create `path` and missing parents with mode 0700 (os.makedirs applies its mode to the leaf only)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass  # made by a concurrent vtap
    return missing[0] if missing else path


def open_private(path: str, flags: int) -> int:
    """os.open for vtap's own files: created 0600, no symlink followed, nobody else's file used.

    An existing file of ours that is not 0600 (made by an older vtap) is made 0600.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the name is a symlink
            raise OperationFailed(f"{path} is a symbolic link; vtap does not open its files through links") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OperationFailed(f"{path} is not a regular file")
        if not _trusted(info.st_uid):
            raise OperationFailed(f"{path} belongs to uid {info.st_uid}, not to root or to the user vtap runs as")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str, text: str) -> None:
    """Replace `path` by `text` atomically (a new 0600 file renamed over it)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(temporary)  # left by a crashed process of the same pid
    except FileNotFoundError:
        pass
    try:
        with os.fdopen(open_private(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        try:  # a full disk must not leave half a file behind
            os.unlink(temporary)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------- capture files


def check_capture_path(path, field: str = "target") -> str:
    """The absolute path, if vtap may write a capture there; ValidationError naming the rule otherwise.

    The folder must exist and be reached only through symlinks of root or the
    caller in folders others cannot change. An existing file must be a regular
    file of root or the caller, mode 0600, not hard-linked elsewhere, and empty
    or pcapng: vtap appends only to its own captures.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValidationError(field, f"{path!r} is not a file path")
    try:
        path.encode()
    except UnicodeEncodeError:
        raise ValidationError(field, f"{path!r} is not valid UTF-8") from None
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    _resolve_folder(folder, field)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    _check_existing(path, info, field)
    if info.st_size:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            _check_same_file(path, info, os.fstat(fd), field)
            head = os.pread(fd, 4, 0)
        finally:
            os.close(fd)
        if head != PCAPNG_MAGIC:
            raise ValidationError(field, f"{path} exists and is not a pcapng file; vtap appends only to its own captures")
    return path


def open_capture(path: str, append: bool, field: str = "target") -> int:
    """A write descriptor on the capture file (created 0600), checked as check_capture_path says.

    The folder is opened component by component without following links, and
    the file itself with O_NOFOLLOW, so a link planted after the check is not followed.
    """
    path = check_capture_path(path, field)
    folder, name = os.path.split(path)
    folder_fd = _open_folder(_resolve_folder(folder, field), field)
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_APPEND if append else 0)
        try:
            fd = os.open(name, flags, 0o600, dir_fd=folder_fd)
        except OSError as exc:
            raise ValidationError(field, f"{path}: {exc.strerror}") from None
    finally:
        os.close(folder_fd)
    try:
        info = os.fstat(fd)
        _check_existing(path, info, field)
        if info.st_size and os.pread(fd, 4, 0) != PCAPNG_MAGIC:
            raise ValidationError(field, f"{path} exists and is not a pcapng file; vtap appends only to its own captures")
        if not append:
            os.ftruncate(fd, 0)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_existing(path: str, info: os.stat_result, field: str) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise ValidationError(field, f"{path} is a symbolic link; vtap writes captures only to regular files")
    if stat.S_ISDIR(info.st_mode):
        raise ValidationError(field, f"{path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValidationError(field, f"{path} is not a regular file (a FIFO, socket or device); vtap writes captures only to regular files")
    if not _trusted(info.st_uid):
        raise ValidationError(field, f"{path} belongs to uid {info.st_uid}; vtap writes only to files of root or of the user running it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ValidationError(field, f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; an existing capture file must be 0600 (others could read the traffic)")
    if info.st_nlink > 1:
        raise ValidationError(field, f"{path} has other hard links; vtap writes only to a file of its own")


def _check_same_file(path: str, before: os.stat_result, now: os.stat_result, field: str) -> None:
    if (before.st_dev, before.st_ino) != (now.st_dev, now.st_ino):
        raise ValidationError(field, f"{path} was replaced while vtap checked it")


def _resolve_folder(folder: str, field: str) -> str:
    """The folder's real path, following only symlinks that root or the caller own in folders others cannot change."""
    parts = [p for p in folder.split("/") if p]
    current = "/"
    followed = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            raise ValidationError(field, f"folder {folder} does not exist ({candidate} is missing)") from None
        except OSError as exc:
            raise ValidationError(field, f"folder {folder}: {candidate}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            _check_link(candidate, info, current, folder, field)
            followed += 1
            if followed > MAX_SYMLINKS:
                raise ValidationError(field, f"folder {folder}: too many symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise ValidationError(field, f"folder {folder}: {candidate} is not a folder")
        current = candidate
    return current


def _check_link(link: str, info: os.stat_result, parent: str, folder: str, field: str) -> None:
    parent_info = os.stat(parent)
    others_can_replace = parent_info.st_mode & 0o022 and not parent_info.st_mode & stat.S_ISVTX
    if not _trusted(info.st_uid) or not _trusted(parent_info.st_uid) or others_can_replace:
        raise ValidationError(field, f"folder {folder}: {link} is a symbolic link another user controls; give the real path")


def _open_folder(real: str, field: str) -> int:
    """A descriptor of the folder `real` (a path without symlinks), opened without following any."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in real.split("/") if p]:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                raise ValidationError(field, f"folder {real} changed while vtap checked it") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd
