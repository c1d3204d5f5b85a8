"""One libvirt connection that heals itself, and the domain events behind `vtap follow`.

Calls go through Libvirt.call(): a broken connection (libvirtd restarted) is
reopened once on the spot; if libvirtd is still away that is a TemporaryError,
which the follower retries with backoff.

Events need libvirt's default event loop, registered once per process before
the watching connection is opened, and run in a daemon thread. The watching
connection has keepalive on and a close callback, so a dead libvirtd is
noticed within seconds; it is then reopened with backoff, and a None hint
("look at everything") is yielded so the follower resyncs.
"""

from __future__ import annotations

import logging
import queue
import threading

import libvirt
import tenacity

from vtap_core.errors import OperationFailed, TemporaryError

log = logging.getLogger("vtap.kvm")
CLOSED = object()  # queued by the close callback
KEEPALIVE_INTERVAL = 1  # seconds between keepalive probes
KEEPALIVE_COUNT = 3  # unanswered probes before the connection is declared dead

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _silence(_ctx, _err):
    """libvirt prints every error to stderr by default; vtap reports its own one line."""


libvirt.registerErrorHandler(_silence, None)


def start_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="vtap-libvirt-events", daemon=True).start()
        _event_loop_started = True


def is_connection_error(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE) or exc.get_error_code() in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
    )


class Libvirt:
    def __init__(self, uri: str, metrics=None):
        self.uri = uri
        self.metrics = metrics
        self._conn = None
        self._lock = threading.Lock()
        # Which subscription to domain events is live (0: none). What was read while one
        # number holds is kept true by the events that follow (see KvmDriver.inventory).
        self.listening = 0
        self._subscriptions = 0

    def _open(self):
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise TemporaryError(f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}") from None

    def call(self, fn):
        """fn(conn) on a live connection; reopened once if libvirtd went away meanwhile."""
        for attempt in (1, 2):
            with self._lock:
                if self._conn is None:
                    self._conn = self._open()
                conn = self._conn
            try:
                return fn(conn)
            except libvirt.libvirtError as exc:
                if not (is_connection_error(exc) or not _alive(conn)):
                    raise OperationFailed(f"libvirt at {self.uri}: {exc.get_error_message()}") from None
                self.reset()
                if attempt == 2:
                    raise TemporaryError(f"lost the connection to libvirt at {self.uri}: {exc.get_error_message()}") from None

    def reset(self):
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    close = reset

    # events ------------------------------------------------------------------

    def watch(self, stop: threading.Event):
        """Yield VM UUIDs that had a lifecycle or device event; None after every reconnect."""
        start_event_loop()
        backoff = tenacity.wait_exponential(multiplier=0.2, max=5)
        attempt, connected_before, missed_events = 0, False, False
        while not stop.is_set():
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                if stop.is_set():
                    break  # stopped while trying: no retry to announce
                attempt += 1
                missed_events = True
                delay = backoff(_state(attempt))
                log.warning("libvirt at %s unreachable (%s), retrying in %.1fs", self.uri, exc.get_error_message(), delay)
                stop.wait(delay)
                continue
            attempt = 0
            if connected_before:
                log.info("reconnected to libvirt at %s", self.uri)
                if self.metrics is not None:
                    self.metrics.count_reconnect()
                self.reset()  # the call() connection died with the same daemon
            if missed_events:
                yield None  # whatever happened while we were not listening: look at everything
            connected_before, missed_events = True, True
            yield from self._events(conn, stop)

    def _events(self, conn, stop: threading.Event):
        hints: queue.Queue = queue.Queue()

        def domain_event(_conn, dom, *_args):
            hints.put(dom.UUIDString())

        callbacks = []
        try:
            for event in (
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,  # a retag can change what a selector taps
            ):
                callbacks.append(conn.domainEventRegisterAny(None, event, domain_event, None))
            conn.registerCloseCallback(lambda *_: hints.put(CLOSED), None)
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            except libvirt.libvirtError:
                pass  # in-process drivers (test:///) have no keepalive, and no daemon to lose
        except libvirt.libvirtError as exc:
            log.warning("subscribing to libvirt events failed: %s", exc.get_error_message())
            _close_quietly(conn)
            stop.wait(1.0)
            return
        self._subscriptions += 1
        self.listening = self._subscriptions
        try:
            while not stop.is_set():
                try:
                    hint = hints.get(timeout=0.5)
                except queue.Empty:
                    if not _alive(conn):
                        break
                    continue
                if hint is CLOSED:
                    break
                yield hint
            if not stop.is_set():
                log.warning("lost the connection to libvirt at %s; reconnecting", self.uri)
        finally:
            self.listening = 0
            for callback in callbacks:
                try:
                    conn.domainEventDeregisterAny(callback)
                except libvirt.libvirtError:
                    pass
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            _close_quietly(conn)


def _state(attempt: int):
    """A RetryCallState for tenacity's wait strategies, outside a Retrying loop."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


def _alive(conn) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _close_quietly(conn):
    try:
        conn.close()
    except libvirt.libvirtError:
        pass
