"""The small contract every platform implements.

A driver turns desired sessions and flows into Bindings: the concrete things
it puts on the platform (a tc filter on one device and direction, a VXLAN
device, an OVS Mirror row, a VspanSession). It reads the same Bindings back
from the platform by the marks it left on them. The core compares the two
sets (reconcile.py) and asks the driver to apply or remove the difference,
so every driver gets idempotency, drift repair and orphan cleanup for free.

Methods (os-vif's plugin base is three; this one is six because it must also
read the platform back and follow it):

    describe()            what the driver is and which features it realizes
    inventory()           the VMs (or interfaces) it can see
    plan(sessions, flows) desired Bindings; refuses what it cannot realize
    observe()             Bindings found on the platform by vtap's marks
    apply(bindings)       create or replace these; idempotent
    remove(bindings)      delete these; deleting what is gone is not an error
    watch(stop)           yields hints (a VM UUID, or None for "look at everything")
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from vtap_core.errors import Unsupported
from vtap_core.model import VM, TapFlow, TapSession


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """The target side of a mirror, as the platform shows it.

    tx_dropped/tx_errors: the target device's own transmit counters (all its
    traffic, since it was created). cut: why copies are dropped or cut on the
    way (e.g. a target MTU smaller than the source's): the flow is not
    `active`. note: what changes copies without losing them (fragments).
    """

    device: str
    tx_dropped: int = 0
    tx_errors: int = 0
    cut: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class Counters:
    packets: int = 0
    bytes: int = 0
    # Copies lost on the way to the target: on a mirror, those the target device refused (tc: the
    # mirred action's overlimits); on a pcap sink, those that never reached the file (ring full, sink drops).
    dropped: int = 0
    target: TargetHealth | None = None


@dataclass(frozen=True, slots=True)  # tens of thousands of them at a time: no __dict__ each
class Binding:
    """One thing vtap keeps on a platform.

    `key` is unique and stable (a driver-chosen path such as
    "tc/vnet3/ingress/web-1"); `spec` is everything that must be true of it,
    as a tuple of (name, value) pairs, so a changed spec means replace.
    """

    key: str
    session: str
    flow: str | None = None  # None for things a whole session owns (a tunnel device)
    vm: str | None = None  # the VM UUID this binding follows, if any
    spec: tuple = ()
    counters: Counters | None = field(default=None, compare=False)
    # Apply order: lower first; remove goes the other way (targets before filters).
    order: int = field(default=1, compare=False)
    # Observed as planned but not working (why: a device down, a capture process gone): not
    # counted as in place, mended where it stands by apply, removed like any other when unwanted.
    broken: str | None = field(default=None, compare=False)

    def get(self, name, default=None):
        for key, value in self.spec:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class Features:
    targets: frozenset = frozenset()  # target kinds: port, vm, vxlan, gre, erspan, pcap
    sources: frozenset = frozenset({"vm"})  # vm and/or interface
    filter: bool = False
    sample: bool = False
    snaplen_targets: frozenset = frozenset()  # target kinds where snaplen works
    backends: tuple = ()
    selector_keys: frozenset = frozenset()  # the VM facts --select can match here (selectors.KEYS)
    # The platform is one central manager (vCenter) rather than each host's own: in a fleet, the
    # followers of one manager elect a leader and only it applies (vtap_core/leader.py).
    central_manager: bool = False


@dataclass(frozen=True)
class Description:
    name: str
    summary: str
    features: Features
    connection: dict = field(default_factory=dict)  # what it is connected to (no secrets)


class Driver(abc.ABC):
    """Base class of every platform driver (loaded through stevedore)."""

    name = "?"
    # Connection options this driver takes, as {option: (env var, help)}.
    options: dict = {}

    def __init__(self, **options):
        self.settings = options

    @abc.abstractmethod
    def describe(self) -> Description: ...

    @abc.abstractmethod
    def inventory(self) -> list[VM]: ...

    @abc.abstractmethod
    def plan(self, sessions: Iterable[TapSession], flows: Iterable[TapFlow]) -> list[Binding]: ...

    @abc.abstractmethod
    def observe(self) -> list[Binding]: ...

    @abc.abstractmethod
    def apply(self, bindings: Iterable[Binding]) -> None: ...

    @abc.abstractmethod
    def remove(self, bindings: Iterable[Binding]) -> None: ...

    def watch(self, stop: threading.Event) -> Iterator[str | None]:
        """Hints that something changed: a VM UUID, or None for everything.

        The default has no events: the follower's periodic resync is all.
        """
        stop.wait()
        return iter(())

    def close(self) -> None:
        """Release connections."""

    # Shared helpers -------------------------------------------------------

    def check_features(self, session: TapSession, flows: Iterable[TapFlow]) -> None:
        """Refuse, before anything changes, what describe() says this driver cannot do."""
        features = self.describe().features
        if session.target.kind not in features.targets:
            raise Unsupported(self.name, f"{session.target.kind} targets", f"targets here are {', '.join(sorted(features.targets))}")
        if session.snaplen is not None and session.target.kind not in features.snaplen_targets:
            where = f" (only with {', '.join(sorted(features.snaplen_targets))} targets)" if features.snaplen_targets else ""
            raise Unsupported(self.name, "snaplen", f"this data path copies whole frames{where}")
        if session.sample not in (None, 1) and not features.sample:
            raise Unsupported(self.name, "sample")
        if session.backend is not None and session.backend not in features.backends:
            allowed = ", ".join(features.backends) or "none"
            raise Unsupported(self.name, f"backend {session.backend}", f"allowed: {allowed}")
        for flow in flows:
            if flow.source.select:
                self._check_selector(flow.source.select, features)
            kind = "interface" if flow.source.interface else "vm"
            if kind not in features.sources:
                raise Unsupported(self.name, f"{kind} sources", f"sources here are {', '.join(sorted(features.sources))}")
            if flow.filter and not features.filter:
                raise Unsupported(self.name, "filter expressions")

    def _check_selector(self, expression: str, features: Features) -> None:
        from vtap_core.selectors import parse

        if not features.selector_keys:
            raise Unsupported(self.name, "selector sources (--select)")
        for term in parse(expression):
            if term.key not in features.selector_keys:
                raise Unsupported(self.name, f"selector key {term.key!r}", f"keys here: {', '.join(sorted(features.selector_keys))}")
