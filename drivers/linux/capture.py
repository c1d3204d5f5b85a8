"""Userspace capture: a device's frames into pcapng, and `vtap capture` for VXLAN streams.

These are the only places where vtap reads packets in userspace. The kernel
data path transmits the mirrored frames on a vtap-owned sink device (an ifb);
the capture process reads them there through a memory-mapped AF_PACKET ring
(ring.py; never in promiscuous mode), keeps only frames transmitted on the sink (PACKET_OUTGOING,
what mirred produces), restores 802.1Q tags the kernel kept in metadata, and
writes them to the pcap target's file, a ring block at a time (sinkblock.py).

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
  writes what it holds and what is still in the ring, closes the file and
  removes its pidfile. Kernel drop counts are written to the log.
* A process left behind by a crash is still found (by its command line, which
  names the state dir) and stopped by the next reconcile. If the sink device
  is recreated, the process follows it by name.
* Without rotation the file grows until the session ends. With
  pcap:PATH?max_size=BYTES&max_files=K it is closed before it would grow beyond
  BYTES and kept as PATH.1 (PATH.1 becomes PATH.2, ...; the oldest beyond K
  files in all is deleted); a new PATH starts (created exclusively, 0600).
* Every copy the ring had no room for is counted; the counts are in
  STATE_DIR/capture-NAME.stats (updated every second) and `status` shows them.
* The sink has no queue (noqueue qdisc): a copy goes straight to the ring.
  The ring takes 64 MB of kernel memory per pcap session (ring.py), what the
  socket buffer it replaced could grow to.
* Where sinks get a BPF ring buffer (bpfring.py, --ring; x86 with ring
  buffers and bpffs, either data path) mirrors write their frames there, with
  no clone and nothing sent on the sink; the process reads both rings into
  the one file. A ring full there is counted by the mirror programs (their
  third counter), which `status` shows as dropped.

`capture_vxlan` terminates a VXLAN stream (RFC 7348) on a UDP port and writes
the inner Ethernet frames unchanged to pcapng: `vtap capture --listen
vxlan://ADDR[:PORT][?vni=N] -w FILE`.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

from vtap_core.errors import NotFound, OperationFailed, ValidationError, VtapError
from vtap_core.model import SNAPLEN_MAX, VNI_MAX, VXLAN_DEFAULT_PORT, check_int, check_name, query_options
from vtap_core.safefile import check_capture_path, open_private, private_dirs, write_private
from vtap_drivers.linux.pcapng import PcapngWriter
from vtap_drivers.linux.ring import PacketRing
from vtap_drivers.linux.sinkblock import SinkBlocks

MODULE = "vtap_drivers.linux.capture"

DEVICE_CHECK_INTERVAL = 1.0
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


def capture_device(device: str, path: str, snaplen: int | None = None, netns: str | None = None, stop: threading.Event | None = None, count: int | None = None, append: bool = True) -> int:
    """Write the frames seen on `device` to pcapng at `path` until `stop` is set (or `count` frames).

    Returns the number of frames written.
    """
    ring = PacketRing(device, netns, snaplen)
    try:
        writer = PcapngWriter.create(path, snaplen=snaplen, if_name=device, append=append)
    except BaseException:
        ring.close()
        raise
    try:
        return record_frames(ring, writer, stop, count)
    finally:
        writer.close()
        ring.close()


def record_frames(ring: PacketRing, writer: PcapngWriter, stop: threading.Event | None = None, count: int | None = None, every_second=None) -> int:
    """Copy the frames a device transmits from its ring into `writer` (flushed when idle).

    After `stop` is set, what the ring still holds is written too. If the
    device disappears and comes back under the same name (a recreated sink),
    the ring follows it. every_second() runs about once a second, busy or not.
    """
    stop = stop or threading.Event()
    last_check = time.monotonic()

    def housekeeping():
        nonlocal last_check
        if time.monotonic() - last_check >= DEVICE_CHECK_INTERVAL:
            last_check = time.monotonic()
            ring.rebind_if_recreated()
            if every_second is not None:
                every_second()

    def idle():
        writer.flush()
        housekeeping()

    if count is None:
        # A block at a time: one buffer of pcapng blocks and one write for all its frames.
        epbs = SinkBlocks(writer.snaplen)
        for offset in ring.block_offsets(stop.is_set, idle):
            writer.write_epbs(*epbs.read(ring.map, offset))
            housekeeping()
        return writer.frames
    write = writer.write
    for block in ring.blocks(stop.is_set, idle):
        for frame, timestamp_ns, original in block:
            if writer.frames >= count:
                return writer.frames  # the count was asked for: nothing after it, no draining
            write(frame, timestamp_ns, original)
        if writer.frames >= count:
            return writer.frames
        housekeeping()
    return writer.frames


BPF_RING_BATCH_WAIT = 0.005  # s: after catching up with the BPF ring, gather a batch before looking again,
BPF_RING_BATCH_BYTES = 128 << 10  # but not more than this: a batch still in the CPU's cache copies twice as fast


def record_sink(ring: PacketRing, bpf_ring, writer: PcapngWriter, stop: threading.Event, every_second=None, drain_quiet: float = 0.1, drain_limit: float = 3.0) -> int:
    """record_frames() for a sink that also has a BPF ring buffer (bpfring.RingReader): both into one file.

    A BPF ring record is complete when it is there (no block to wait for), so
    after `stop` both rings are read until neither had anything for
    drain_quiet seconds (an AF_PACKET block is handed over after RETIRE_MS),
    at most drain_limit seconds. When the reader has caught up with the BPF
    ring it waits BPF_RING_BATCH_WAIT before looking again: the kernel wakes a
    reader only for the first record after it caught up, so this bounds those
    wakeups (irq_work) to about two hundred a second, whatever the frame rate.
    It waits less when BPF_RING_BATCH_BYTES would arrive sooner (64 KB frames
    at 6 Gbit/s: waiting 5 ms doubled the reader's CPU per frame).
    """
    from vtap_drivers.linux.ring import RETIRE_MS

    epbs = SinkBlocks(writer.snaplen)
    poller = select.poll()
    poller.register(ring.sock, select.POLLIN | select.POLLERR)
    poller.register(bpf_ring.ring.fileno(), select.POLLIN)
    last_check = last_batch = time.monotonic()
    drain_until = quiet_until = None
    while True:
        now = time.monotonic()
        if drain_until is None and stop.is_set():
            drain_until, quiet_until = now + drain_limit, now + drain_quiet
        if drain_until is not None and now >= drain_until:
            return writer.frames
        busy = False
        offset = ring._ready_block()
        if offset is not None:
            writer.write_epbs(*epbs.read(ring.map, offset))
            ring._release(offset)
            busy = True
        if bpf_ring.available():
            parts, frames = bpf_ring.read()
            writer.write_epbs(parts, frames)
            bpf_ring.release()
            busy = True
            if not bpf_ring.available() and offset is None:
                rate = sum(map(len, parts)) / max(now - last_batch, 1e-6)  # bytes/s since the last batch
                time.sleep(min(BPF_RING_BATCH_WAIT, BPF_RING_BATCH_BYTES / max(rate, 1.0)))
            last_batch = now
        if now - last_check >= DEVICE_CHECK_INTERVAL:
            last_check = now
            ring.rebind_if_recreated()
            bpf_ring.refresh_clock()
            if bpf_ring.recreated() and not bpf_ring.available():  # a new ring pinned under the name: follow it
                poller.unregister(bpf_ring.ring.fileno())
                bpf_ring.reopen()
                poller.register(bpf_ring.ring.fileno(), select.POLLIN)
            if every_second is not None:
                every_second()
        if busy:
            if drain_until is not None:
                quiet_until = time.monotonic() + drain_quiet
            continue
        if drain_until is not None and now >= quiet_until:
            return writer.frames
        writer.flush()
        for _fd, events in poller.poll(RETIRE_MS * 10 if drain_until is None else RETIRE_MS):
            if events & select.POLLERR:
                ring.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # a device going down: not fatal


class CaptureCounts:
    """What a capture process has written and what the kernel dropped, kept in STATE_DIR/capture-NAME.stats.

    The kernel's counts reset when read, so they are added up here; the file
    is replaced whole each time (status reads it while the capture runs).
    """

    def __init__(self, ring: PacketRing, writer: PcapngWriter, state_dir: str, name: str, bpf_ring=None):
        self.ring, self.writer, self.path, self.bpf_ring = ring, writer, _statsfile(state_dir, name), bpf_ring
        self.received = self.dropped = 0
        self.writer_drops = None
        if bpf_ring is not None:
            from vtap_drivers.linux.bpfring import WriterDrops

            self.writer_drops = WriterDrops(bpf_ring.path, bpf_ring.id)

    def update(self) -> None:
        received, dropped, _times_full = self.ring.statistics()
        self.received += received
        self.dropped += dropped
        counts = {"frames": self.writer.frames, "received": self.received, "ring_dropped": self.dropped}
        if self.bpf_ring is not None:  # ring full: counted by the mirror programs writing into it
            counts["bpf_ring_frames"] = self.bpf_ring.records
            if self.writer_drops.ring_id != self.bpf_ring.id:  # the ring was made anew (reopen)
                self.writer_drops.close()
                self.writer_drops = type(self.writer_drops)(self.bpf_ring.path, self.bpf_ring.id)
            counts["bpf_ring_dropped"] = self.writer_drops.update()
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(counts, f)
        os.replace(temporary, self.path)


def capture_counts(state_dir: str, name: str) -> dict | None:
    """{frames, received, ring_dropped} of capture `name` as it last wrote them, or None."""
    try:
        with open(_statsfile(state_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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
    parse_vxlan_listen(listen)  # its own, stricter rules (vni=5&vni=6 is refused)
    from vtap_drivers.linux.terminate import terminate  # imports this module

    return terminate(listen, path, count=count, duration=duration, stop=stop, netns=netns)


# ---------------------------------------------------------------- the pcap target's process


def _pidfile(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, f"capture-{name}.pid")


def _statsfile(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, f"capture-{name}.stats")


def _logfile(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, f"capture-{name}.log")


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python3 -m {MODULE}", description="vtap's capture process for a pcap target (started by vtap)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--snaplen", type=int)
    parser.add_argument("--max-size", type=int, help="rotate the file before it grows beyond this many bytes")
    parser.add_argument("--max-files", type=int, help="with --max-size: keep at most this many files (PATH, PATH.1, ...)")
    parser.add_argument("--netns")
    parser.add_argument("--ring", help="a pinned BPF ring buffer the sink's mirrors write to (bpfring.py)")
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

    {name: {"pid", "device", "path", "snaplen", "netns"[, "ring"]}}; a process whose
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
        if args.max_size is not None:
            found[args.name].update(max_size=args.max_size, max_files=args.max_files)
        if args.ring is not None:
            found[args.name]["ring"] = args.ring
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


def start_capture_process(name: str, device: str, path: str, snaplen: int | None = None, netns: str | None = None, state_dir: str = ".", max_size: int | None = None, max_files: int | None = None, ring: str | None = None) -> int:
    """Start (or keep) the capture process `name`; returns its pid once the file is open.

    Already running with the same parameters: nothing changes. Running with
    other parameters: it is stopped and started again. max_size and max_files
    (both or neither) rotate the file: see PcapngWriter.rotate. ring: the
    pinned BPF ring buffer to read too (bpfring.py).
    """
    check_name("capture name", name)
    path = check_capture_path(path)
    if snaplen is not None:
        snaplen = check_int("snaplen", snaplen, 1, SNAPLEN_MAX)
    private_dirs(state_dir)
    rotation = {}
    if max_size is not None or max_files is not None:
        rotation = {"max_size": check_int("max_size", max_size, 4096, 2**50), "max_files": check_int("max_files", max_files, 1, 10**5)}
    wanted = {"device": device, "path": path, "snaplen": snaplen, "netns": netns, **rotation, **({"ring": ring} if ring else {})}
    with _NameLock(state_dir, name):
        current = running_captures(state_dir).get(name)
        if current is not None:
            if {key: value for key, value in current.items() if key != "pid"} == wanted:
                return current["pid"]
            _stop(name, state_dir, current["pid"])
        return _spawn(name, device, path, snaplen, netns, state_dir, rotation, ring)


def _spawn(name, device, path, snaplen, netns, state_dir, rotation, ring=None) -> int:
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", MODULE, "--name", name, "--device", device, "--path", path, "--state-dir", os.path.abspath(state_dir), "--status-fd", str(write_end)]
    if snaplen is not None:
        command += ["--snaplen", str(snaplen)]
    if netns is not None:
        command += ["--netns", netns]
    if rotation:
        command += ["--max-size", str(rotation["max_size"]), "--max-files", str(rotation["max_files"])]
    if ring:
        command += ["--ring", ring]
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
    try:
        os.unlink(_statsfile(state_dir, name))  # the counts of a process that is gone
    except FileNotFoundError:
        pass


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
        ring = PacketRing(args.device, args.netns, args.snaplen)
    except Exception as exc:
        status.write(f"error: {exc}\n")
        _log(f"failed: {exc}")
        return 1
    bpf_ring = None
    if args.ring:
        from vtap_drivers.linux.bpfring import RingReader

        try:
            bpf_ring = RingReader(args.ring, args.snaplen)
        except Exception as exc:
            ring.close()
            status.write(f"error: BPF ring {args.ring}: {exc}\n")
            _log(f"failed: BPF ring {args.ring}: {exc}")
            return 1
    if os.fork():
        os._exit(0)  # the starter returns; the capture is no child of vtap's and needs no terminal
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        frames = _run_detached(args, ring, stop, status, bpf_ring)
    except Exception as exc:  # the log is all anyone will see of a detached process
        _log(f"failed: {exc}")
        return 1
    finally:
        _remove_pidfile(args.state_dir, args.name, os.getpid())
    _log(f"stopped after {frames} frames")
    return 0


def _run_detached(args, ring, stop, status, bpf_ring=None) -> int:
    # The file is opened here so it exists (with its header) before the starter hears "ready".
    try:
        writer = PcapngWriter.create(args.path, snaplen=args.snaplen, if_name=args.device, append=True, max_size=args.max_size, max_files=args.max_files)
        writer.flush()
    except (OSError, ValueError, VtapError) as exc:
        status.write(f"error: {exc}\n")
        status.close()
        ring.close()
        if bpf_ring is not None:
            bpf_ring.close()
        raise
    _write_pidfile(args.state_dir, args.name)
    status.write(f"ready {os.getpid()}\n")
    status.close()
    _log(f"capturing {args.device}{' in netns ' + args.netns if args.netns else ''} to {args.path}")
    counts = CaptureCounts(ring, writer, args.state_dir, args.name, bpf_ring)
    counts.update()  # zeros now: counts a killed predecessor left are not this process's
    try:
        if bpf_ring is None:
            frames = record_frames(ring, writer, stop, every_second=counts.update)
        else:
            frames = record_sink(ring, bpf_ring, writer, stop, every_second=counts.update)
        counts.update()
        _log(f"{counts.received} frames reached the ring, {counts.dropped} of them dropped by the kernel (ring full)")
        if bpf_ring is not None:
            _log(f"{bpf_ring.records} frames read from the BPF ring, {counts.writer_drops.total} copies the full ring could not take, {bpf_ring.unread()} bytes left unread")
        return frames
    finally:
        writer.close()
        ring.close()
        if bpf_ring is not None:
            counts.writer_drops.close()
            bpf_ring.close()


if __name__ == "__main__":
    sys.exit(main())
