"""Userspace capture: a device's frames into pcapng, and `vtap capture` for VXLAN streams.

These are the only places where vtap reads packets in userspace. The kernel
data path transmits the mirrored frames on a vtap-owned sink device (an ifb);
the capture process reads them there with an AF_PACKET socket (never in
promiscuous mode), keeps only frames transmitted on the sink (PACKET_OUTGOING,
what mirred produces), restores 802.1Q tags the kernel kept in metadata, and
writes them to the pcap target's file.

How a pcap target's capture process lives and ends
--------------------------------------------------
* vtap starts one process per pcap session (`python3 -m vtap_drivers.linux.capture`).
  It detaches from the command that started it (own session, no terminal) and
  keeps running after `vtap` exits; its pid is in STATE_DIR/capture-NAME.pid and
  its messages go to STATE_DIR/capture-NAME.log.
* The file is created with mode 0600. If it already is a pcapng file (the
  process was restarted), the new frames are appended as a new pcapng section,
  so nothing captured before is lost. Frames longer than the session's snaplen
  are cut to snaplen; the file records their original length.
* The file is flushed whenever no frame is waiting, so it can be read (tshark,
  tcpdump -r, Wireshark) while the capture runs.
* Deleting the session (or disabling it) stops the process with SIGTERM: it
  writes what it holds, closes the file and removes its pidfile. Kernel drop
  counts are written to the log.
* A process left behind by a crash is still found (by its command line, which
  names the state dir) and stopped by the next reconcile. If the sink device
  is recreated, the process follows it by name.
* Nothing rotates or limits the file: it grows until the session ends.

`capture_vxlan` terminates a VXLAN stream (RFC 7348) on a UDP port and writes
the inner Ethernet frames unchanged to pcapng: `vtap capture --listen
vxlan://ADDR[:PORT][?vni=N] -w FILE`.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

from vtap_core.errors import NotFound, OperationFailed, ValidationError, VtapError
from vtap_core.model import SNAPLEN_MAX, VNI_MAX, VXLAN_DEFAULT_PORT, check_int, check_name, query_options
from vtap_core.safefile import check_capture_path, open_private, private_dirs, write_private
from vtap_drivers.linux.pcapng import PcapngWriter

MODULE = "vtap_drivers.linux.capture"

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS
SO_RCVBUFFORCE = 33
SIOCGIFINDEX = 0x8933
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
AUXDATA = struct.Struct("IIIHHHH")  # struct tpacket_auxdata
TIMESPEC = struct.Struct("qq")
ANCILLARY_SPACE = socket.CMSG_SPACE(TIMESPEC.size) + socket.CMSG_SPACE(AUXDATA.size)

# Big enough for a GSO super-frame, which is what AF_PACKET sees of a TSO stream.
FRAME_BUFFER = 256 * 1024
# The kernel charges a queued super-frame at its full size (~64 KB): 8 MB overflowed in
# bursts of a 7 Gbit/s TCP stream (bench/datapath.py, pcap scenario), 64 MB did not.
SOCKET_BUFFER = 64 * 1024 * 1024
IDLE_WAIT = 0.2  # seconds between checks of stop/deadline when nothing arrives
DEVICE_CHECK_INTERVAL = 1.0
VXLAN_HEADER = 8
VXLAN_FLAG_I = 0x08
ETHERNET_HEADER = 14
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


# ---------------------------------------------------------------- receiving


def _socket_in(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in network namespace `netns` (the current one when None)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    from pyroute2 import netns as pr_netns

    try:
        # Made in a short-lived child, so no thread of ours changes namespace; flags=0: never create one.
        return pr_netns.create_socket(netns, family, kind, proto, flags=0)
    except FileNotFoundError:
        raise NotFound(f"netns {netns}: no such network namespace") from None


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def _ifindex(sock: socket.socket, device: str) -> int | None:
    """The index of `device` in the socket's own namespace, or None when there is none."""
    request = struct.pack("16sI12x", device.encode(), 0)
    try:
        return struct.unpack("16sI12x", fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, request))[1]
    except OSError:
        return None


def open_packet_socket(device: str, netns: str | None = None) -> socket.socket:
    """An AF_PACKET socket bound to `device`, seeing the frames it sends and receives.

    No promiscuous membership is ever added: the data path transmits its
    copies on the sink device, and a packet socket sees transmitted frames
    (PACKET_OUTGOING) without it. record_frames keeps only those, so whatever
    reaches the sink from elsewhere (a veth peer's own traffic) is not recorded.
    """
    sock = _socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        # VLAN tags the kernel moved into metadata come back through aux data.
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        _enlarge_receive_buffer(sock)
        sock.bind((device, ETH_P_ALL))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENODEV:
            where = f" in netns {netns}" if netns else ""
            raise NotFound(f"device {device}: no such device{where}") from None
        raise
    return sock


def _datagrams(sock: socket.socket, should_stop, on_idle, size: int = FRAME_BUFFER):
    """Yield (buffer view, length on the wire, ancillary data, sender address) until should_stop().

    The view is reused: use it before asking for the next one. on_idle() runs
    whenever nothing is waiting (flush the file then).
    """
    buffer = bytearray(size)
    view = memoryview(buffer)
    while not should_stop():
        try:
            nbytes, ancdata, _flags, address = sock.recvmsg_into([buffer], ANCILLARY_SPACE, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            on_idle()
            select.select([sock], [], [], IDLE_WAIT)
            continue
        except OSError as exc:
            # A packet socket reports its device going down once; it is not fatal.
            if exc.errno in (errno.ENETDOWN, errno.ENXIO):
                continue
            raise
        yield view, nbytes, ancdata, address


def _timestamp_ns(ancdata) -> int:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = TIMESPEC.unpack(data[: TIMESPEC.size])
            return seconds * 1_000_000_000 + nanoseconds
    return time.time_ns()


def _frame_with_vlan_tag(view: memoryview, nbytes: int, ancdata) -> tuple[bytes | memoryview, int]:
    """The frame as it was on the wire: put back an 802.1Q tag the kernel kept aside."""
    captured = view[: min(nbytes, len(view))]
    for level, kind, data in ancdata:
        if level == SOL_PACKET and kind == PACKET_AUXDATA:
            status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack(data[: AUXDATA.size])
            if status & TP_STATUS_VLAN_VALID:
                tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
                return bytes(captured[:12]) + struct.pack("!HH", tpid, tci) + bytes(captured[12:]), nbytes + 4
    return captured, nbytes


def capture_device(device: str, path: str, snaplen: int | None = None, netns: str | None = None, stop: threading.Event | None = None, count: int | None = None, append: bool = True) -> int:
    """Write the frames seen on `device` to pcapng at `path` until `stop` is set (or `count` frames).

    Returns the number of frames written.
    """
    sock = open_packet_socket(device, netns)
    try:
        writer = PcapngWriter.create(path, snaplen=snaplen, if_name=device, append=append)
    except BaseException:
        sock.close()
        raise
    try:
        return record_frames(sock, writer, device, stop, count)
    finally:
        writer.close()
        sock.close()


def record_frames(sock: socket.socket, writer: PcapngWriter, device: str, stop: threading.Event | None = None, count: int | None = None) -> int:
    """Copy frames from a bound packet socket into `writer` (flushed when idle).

    If the device disappears and comes back under the same name (a recreated
    sink), the socket follows it.
    """
    stop = stop or threading.Event()
    bound = _ifindex(sock, device)
    last_check = time.monotonic()

    def on_idle():
        nonlocal bound, last_check
        writer.flush()
        if time.monotonic() - last_check >= DEVICE_CHECK_INTERVAL:
            last_check = time.monotonic()
            now = _ifindex(sock, device)
            if now is not None and now != bound:
                sock.bind((device, ETH_P_ALL))
                bound = now

    def should_stop():
        return stop.is_set() or (count is not None and writer.frames >= count)

    # With a snaplen the kernel need not copy more than that (the length on the wire still comes back).
    size = writer.snaplen or FRAME_BUFFER
    for view, nbytes, ancdata, address in _datagrams(sock, should_stop, on_idle, size):
        if address[2] != socket.PACKET_OUTGOING:
            continue
        frame, original = _frame_with_vlan_tag(view, nbytes, ancdata)
        writer.write(frame, _timestamp_ns(ancdata), original)
    return writer.frames


def kernel_drops(sock: socket.socket) -> tuple[int, int]:
    """(frames received, frames dropped) by this packet socket since the last call (reading resets them)."""
    received, dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return received, dropped


# ---------------------------------------------------------------- vtap capture --listen vxlan://


def parse_vxlan_listen(text: str) -> tuple[str, int, int | None]:
    """vxlan://ADDR[:PORT][?vni=N] -> (address, UDP port, VNI or None for any)."""
    rule = "write vxlan://ADDR[:PORT][?vni=N], ADDR a local IP address (0.0.0.0 or [::] for all)"
    if not isinstance(text, str) or not text.startswith("vxlan://"):
        raise ValidationError("listen", f"{text!r}: {rule}")
    try:
        url = urlsplit(text)
        host, port = url.hostname, url.port
        ipaddress.ip_address(host or "")
    except ValueError:
        raise ValidationError("listen", f"{text!r}: {rule}") from None
    query = query_options(text, url.query, "listen")  # vni=5&vni=6 is refused, not "the last one wins"
    if url.path not in ("", "/") or url.fragment or url.username or set(query) - {"vni"}:
        raise ValidationError("listen", f"{text!r}: {rule}")
    port = VXLAN_DEFAULT_PORT if port is None else check_int("listen port", port, 1, 65535)
    vni = check_int("listen vni", query["vni"], 0, VNI_MAX) if "vni" in query else None
    return host, port, vni


def open_vxlan_socket(address: str, port: int, netns: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = _socket_in(netns, family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        _enlarge_receive_buffer(sock)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OperationFailed(f"listen: UDP port {port} on {address} is already in use (a kernel vxlan device or another capture?)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ValidationError("listen", f"{address} is not an address of this host") from None
        raise
    return sock


def capture_vxlan(listen: str, path: str, count: int | None = None, duration: float | None = None, stop: threading.Event | None = None, netns: str | None = None) -> int:
    """Write the inner frames of a VXLAN stream to pcapng until count, duration, stop or Ctrl-C.

    Packets without the I flag, too short to hold a frame, or (with ?vni=N)
    of another VNI are ignored. Returns the number of frames written.
    """
    address, port, vni = parse_vxlan_listen(listen)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValidationError("count", f"{count!r} is not a number of frames (1 or more)")
    if duration is not None and not (isinstance(duration, (int, float)) and duration > 0):
        raise ValidationError("duration", f"{duration!r} is not a positive number of seconds")
    check_capture_path(path, field="-w")
    stop = stop or threading.Event()
    deadline = None if duration is None else time.monotonic() + duration
    sock = open_vxlan_socket(address, port, netns)
    writer = PcapngWriter.create(path, if_name=listen)

    def should_stop():
        return stop.is_set() or (count is not None and writer.frames >= count) or (deadline is not None and time.monotonic() >= deadline)

    try:
        for view, nbytes, ancdata, _sender in _datagrams(sock, should_stop, writer.flush):
            if nbytes < VXLAN_HEADER + ETHERNET_HEADER or nbytes > len(view) or not view[0] & VXLAN_FLAG_I:
                continue
            if vni is not None and int.from_bytes(view[4:7], "big") != vni:
                continue
            writer.write(view[VXLAN_HEADER:nbytes], _timestamp_ns(ancdata))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user ends an open-ended capture
    finally:
        writer.close()
        sock.close()
    return writer.frames


# ---------------------------------------------------------------- the pcap target's process


def _pidfile(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, f"capture-{name}.pid")


def _logfile(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, f"capture-{name}.log")


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python3 -m {MODULE}", description="vtap's capture process for a pcap target (started by vtap)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--snaplen", type=int)
    parser.add_argument("--netns")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--status-fd", type=int, help="where to say 'ready PID' or 'error: ...' once")
    return parser


def _command_line(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _is_gone(pid: int) -> bool:
    """True when the process has ended (a zombie waiting for init counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def running_captures(state_dir: str) -> dict[str, dict]:
    """Capture processes of this state dir, found by their command lines, not only by pidfiles.

    {name: {"pid", "device", "path", "snaplen", "netns"}}; a process whose
    pidfile was lost (a crash between start and bookkeeping) is listed too.
    """
    state_dir = os.path.realpath(state_dir)
    found = {}
    parser = _argument_parser()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _command_line(int(entry))
        if not argv or MODULE not in argv:
            continue
        try:
            args, _ = parser.parse_known_args(argv[argv.index(MODULE) + 1 :])
        except SystemExit:
            continue
        if os.path.realpath(args.state_dir) != state_dir or _is_gone(int(entry)):
            continue
        found[args.name] = {"pid": int(entry), "device": args.device, "path": args.path, "snaplen": args.snaplen, "netns": args.netns}
    return found


class _NameLock:
    """Serializes start/stop of one capture name (two vtap commands at once)."""

    def __init__(self, state_dir: str, name: str):
        self.path = os.path.join(state_dir, f"capture-{name}.lock")

    def __enter__(self):
        self.fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)


def start_capture_process(name: str, device: str, path: str, snaplen: int | None = None, netns: str | None = None, state_dir: str = ".") -> int:
    """Start (or keep) the capture process `name`; returns its pid once the file is open.

    Already running with the same parameters: nothing changes. Running with
    other parameters: it is stopped and started again.
    """
    check_name("capture name", name)
    path = check_capture_path(path)
    if snaplen is not None:
        snaplen = check_int("snaplen", snaplen, 1, SNAPLEN_MAX)
    private_dirs(state_dir)
    wanted = {"device": device, "path": path, "snaplen": snaplen, "netns": netns}
    with _NameLock(state_dir, name):
        current = running_captures(state_dir).get(name)
        if current is not None:
            if {key: current[key] for key in wanted} == wanted:
                return current["pid"]
            _stop(name, state_dir, current["pid"])
        return _spawn(name, device, path, snaplen, netns, state_dir)


def _spawn(name, device, path, snaplen, netns, state_dir) -> int:
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", MODULE, "--name", name, "--device", device, "--path", path, "--state-dir", os.path.abspath(state_dir), "--status-fd", str(write_end)]
    if snaplen is not None:
        command += ["--snaplen", str(snaplen)]
    if netns is not None:
        command += ["--netns", netns]
    try:
        with os.fdopen(open_private(_logfile(state_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab") as log:
            starter = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(write_end,), start_new_session=True, cwd="/")
    finally:
        os.close(write_end)
    try:
        status = _read_line(read_end, START_TIMEOUT)
    finally:
        os.close(read_end)
        starter.wait(timeout=START_TIMEOUT)  # the starter exits as soon as the capture runs detached
    if status.startswith("ready "):
        return int(status.split()[1])
    reason = status.removeprefix("error: ") or f"it did not start; see {_logfile(state_dir, name)}"
    raise OperationFailed(f"capture {name}: {reason}")


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def stop_capture_process(name: str, state_dir: str) -> bool:
    """Stop capture `name` cleanly (SIGTERM: file flushed and closed). False when none was running."""
    with _NameLock(state_dir, name):
        current = running_captures(state_dir).get(name)
        if current is None:
            _remove_pidfile(state_dir, name)
            return False
        _stop(name, state_dir, current["pid"])
        return True


def _stop(name: str, state_dir: str, pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while not _is_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _is_gone(pid):
        # It did not finish in time: the file may lack its last frames, never its earlier ones.
        os.kill(pid, signal.SIGKILL)
    _remove_pidfile(state_dir, name)


def _remove_pidfile(state_dir: str, name: str, pid: int | None = None) -> None:
    """Remove the pidfile (only when it names `pid`, if given)."""
    pidfile = _pidfile(state_dir, name)
    try:
        if pid is not None:
            with open(pidfile) as f:
                if f.read().strip() != str(pid):
                    return
        os.unlink(pidfile)
    except FileNotFoundError:
        pass


def _write_pidfile(state_dir: str, name: str) -> None:
    pidfile = _pidfile(state_dir, name)
    write_private(pidfile, f"{os.getpid()}\n")


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} capture[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """The process itself: open socket and file, detach, capture until SIGTERM."""
    args = _argument_parser().parse_args(argv)
    status = os.fdopen(args.status_fd, "w") if args.status_fd is not None else sys.stdout
    try:
        sock = open_packet_socket(args.device, args.netns)
    except Exception as exc:
        status.write(f"error: {exc}\n")
        _log(f"failed: {exc}")
        return 1
    if os.fork():
        os._exit(0)  # the starter returns; the capture is no child of vtap's and needs no terminal
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        frames = _run_detached(args, sock, stop, status)
    except Exception as exc:  # the log is all anyone will see of a detached process
        _log(f"failed: {exc}")
        return 1
    finally:
        _remove_pidfile(args.state_dir, args.name, os.getpid())
    _log(f"stopped after {frames} frames")
    return 0


def _run_detached(args, sock, stop, status) -> int:
    # The file is opened here so it exists (with its header) before the starter hears "ready".
    try:
        writer = PcapngWriter.create(args.path, snaplen=args.snaplen, if_name=args.device, append=True)
        writer.flush()
    except (OSError, ValueError, VtapError) as exc:
        status.write(f"error: {exc}\n")
        status.close()
        sock.close()
        raise
    _write_pidfile(args.state_dir, args.name)
    status.write(f"ready {os.getpid()}\n")
    status.close()
    _log(f"capturing {args.device}{' in netns ' + args.netns if args.netns else ''} to {args.path}")
    try:
        frames = record_frames(sock, writer, args.device, stop)
        received, dropped = kernel_drops(sock)
        _log(f"{received} frames reached the socket, {dropped} of them dropped by the kernel (socket buffer full)")
        return frames
    finally:
        writer.close()
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
