"""Selector sources: one flow that taps every VM matching an expression, now and later.

    EXPR  := TERM ("," TERM)*          every term must hold (and)
    TERM  := KEY "=" GLOB | KEY "!=" GLOB
    KEY   := name | tag | folder | pool | host | network

GLOB is a shell pattern (`*`, `?`, `[abc]`), matched case-sensitively against
the facts a driver reads for each VM (`VM.facts()`): its name, tags, folder
(vsphere), pool (proxmox), host and the networks of its NICs. `KEY=GLOB` holds
when any of the VM's values for KEY matches; `KEY!=GLOB` when none does (a VM
without a tag satisfies `tag!=lab`). A positive `network=` term also narrows
which NICs of a matching VM are tapped: only those on a matching network.

A selector flow is expanded at plan time (level-triggered, like everything
else): its members are the (VM, NIC) pairs that match now, each realized as a
member flow `FLOW@UUID#MAC` the drivers plan like any single-VM flow. The
session's own target VM is never a member, and a flow whose members would
exceed the cap is refused at `flow add` and a problem afterwards.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field

from vtap_core.errors import ValidationError

KEYS = ("name", "tag", "folder", "pool", "host", "network")
DEFAULT_CAP = 1000  # NICs one selector flow may tap (VTAP_SELECTOR_CAP overrides)
TERM_RE = re.compile(r"^(?P<key>[a-z]+)\s*(?P<op>!=|=)\s*(?P<glob>.+)$")
GRAMMAR = "KEY=GLOB or KEY!=GLOB joined by ',' (keys: " + ", ".join(KEYS) + ")"


@dataclass(frozen=True)
class Term:
    key: str
    negate: bool
    glob: str

    def __str__(self):
        return f"{self.key}{'!=' if self.negate else '='}{self.glob}"

    def holds(self, values) -> bool:
        hit = any(fnmatch.fnmatchcase(str(v), self.glob) for v in values if v is not None)
        return not hit if self.negate else hit


def parse(text) -> tuple[Term, ...]:
    """The terms of a selector expression; ValidationError naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ValidationError("select", f"{text!r} is not a selector ({GRAMMAR})")
    terms = []
    for part in text.split(","):
        match = TERM_RE.match(part.strip())
        if not match:
            raise ValidationError("select", f"{part.strip()!r} is not a selector term ({GRAMMAR})")
        key, op, glob = match["key"], match["op"], match["glob"].strip()
        if key not in KEYS:
            raise ValidationError("select", f"unknown key {key!r}; keys: {', '.join(KEYS)}")
        check_glob(glob)
        terms.append(Term(key, op == "!=", glob))
    return tuple(terms)


def check_glob(glob: str) -> None:
    """Refuse patterns fnmatch would silently read another way (an unclosed '[' matches itself)."""
    if not glob.isprintable():
        raise ValidationError("select", f"{glob!r}: a pattern is printable text")
    i = 0
    while i < len(glob):
        if glob[i] != "[":
            i += 1
            continue
        j = i + 1 + (glob[i + 1:i + 2] in ("!", "^"))
        j += glob[j:j + 1] == "]"  # a ']' right after '[' (or '[!') is a literal
        close = glob.find("]", j)
        if close < 0:
            raise ValidationError("select", f"{glob!r}: the '[' at position {i} is never closed")
        i = close + 1


def cap() -> int:
    """NICs one selector flow may tap: VTAP_SELECTOR_CAP, else DEFAULT_CAP."""
    try:
        return max(1, int(os.environ.get("VTAP_SELECTOR_CAP", DEFAULT_CAP)))
    except ValueError:
        return DEFAULT_CAP


def canonical(text: str) -> str:
    return ",".join(str(t) for t in parse(text))


@dataclass(frozen=True)
class Member:
    """One (VM, NIC) a selector flow taps now, and why it matched."""

    vm: str
    vm_name: str
    nic: str | None
    host: str | None
    why: str


@dataclass
class Expansion:
    flows: list = field(default_factory=list)  # plain flows plus member flows
    members: dict = field(default_factory=dict)  # selector flow name -> [Member]
    problems: list = field(default_factory=list)  # (session, flow, why)


def matching(terms, vm) -> list:
    """The NICs of `vm` a selector taps (empty: no match)."""
    from vtap_core.model import nic_networks

    if not all(term.holds(vm.fact(term.key)) for term in terms):  # stops at the first term that fails
        return []
    networks = [t for t in terms if t.key == "network" and not t.negate]
    return [nic for nic in vm.nics if all(t.holds(nic_networks(nic)) for t in networks)]


def reasons(terms, vm) -> str:
    out = []
    for term in terms:
        values = [v for v in vm.fact(term.key) if v is not None]
        hits = [v for v in values if fnmatch.fnmatchcase(str(v), term.glob)]
        out.append(f"{term}: " + (f"no {term.key} matches" if term.negate else f"{term.key} {', '.join(map(str, hits))}"))
    return "; ".join(out)


class MatchMemo:
    """What a selector matched on each VM object, kept while the driver hands out the same objects.

    A driver that keeps its inventory between reads (kvm) gives back the very VM object
    of a domain nothing happened to: with thousands of VMs, an event about one of them
    then matches one VM again, not all. VMs are immutable, so an object's answer holds.
    """

    def __init__(self):
        self._by_select: dict = {}  # selector text -> {id(vm): (vm, nics, why)}

    def matches(self, select: str, terms, vms) -> list:
        """[(vm, nics, why)] of the VMs whose NICs the selector taps."""
        before = self._by_select.get(select, {})
        now, out = {}, []
        for vm in vms:
            known = before.get(id(vm))
            if known is None or known[0] is not vm:
                nics = matching(terms, vm)
                known = (vm, nics, reasons(terms, vm) if nics else None)
            now[id(vm)] = known
            if known[1]:
                out.append(known)
        self._by_select[select] = now  # only the VMs of this read: the memo never outgrows the inventory
        return out

    def keep_only(self, selects) -> None:
        """Forget selectors no flow uses any more."""
        for select in set(self._by_select) - set(selects):
            self._by_select.pop(select, None)


MEMO = MatchMemo()


def members_of(flow, session, vms, cap: int, memo: MatchMemo | None = None) -> list[Member]:
    """The members of one selector flow; ValidationError when there are more NICs than `cap`."""
    terms = parse(flow.source.select)
    target_vm = session.target.vm if session.target.kind == "vm" else None
    out = []
    matched = (memo or MatchMemo()).matches(flow.source.select, terms, vms)
    for vm, nics, why in sorted(matched, key=lambda m: (m[0].name, m[0].uuid)):
        if target_vm and target_vm in (vm.uuid, vm.ref):
            continue  # never mirror the target into itself
        for nic in nics:
            if target_vm and session.target.mac == nic.mac:
                continue
            out.append(Member(vm.ref, vm.name, nic.mac or None, vm.host, why))
    if len(out) > cap:
        raise ValidationError("select", f"{flow.source.select!r} matches {len(out)} NICs, more than the cap of {cap} (raise it with VTAP_SELECTOR_CAP)")
    return out


def expand(sessions, flows, inventory, cap: int = DEFAULT_CAP, scope: str | None = None) -> Expansion:
    """Plain flows as they are; each selector flow replaced by its member flows.

    `inventory` is called only when some flow has a selector (it may be slow).
    A selector flow that cannot be expanded (over the cap) is a problem and has no members.
    With a `scope` (a VM's UUID or ref), `members` still lists every member, but member
    flows are made only for that VM's: a reconcile scoped to it looks at nothing else.
    """
    from vtap_core.model import member_flow

    result = Expansion()
    selector_flows = [f for f in flows if f.source.select]
    result.flows = [f for f in flows if not f.source.select]
    if not selector_flows:
        return result
    vms = inventory()
    MEMO.keep_only(f.source.select for f in selector_flows)
    mine = None if scope is None else _refs(scope, vms)
    by_name = {s.name: s for s in sessions}
    for flow in selector_flows:
        session = by_name.get(flow.session)
        if session is None:
            continue
        try:
            members = members_of(flow, session, vms, cap, MEMO)
        except ValidationError as exc:
            result.problems.append((flow.session, flow.name, str(exc)))
            result.members[flow.name] = []
            continue
        result.members[flow.name] = members
        result.flows.extend(member_flow(flow, m.vm, m.nic) for m in members if mine is None or m.vm in mine)
    return result


def _refs(scope: str, vms) -> set:
    """What members name the VM `scope` by; every VM's ref when none answers to it (nothing to narrow by)."""
    refs = {vm.ref for vm in vms if scope in (vm.uuid, vm.ref)}
    return refs or {vm.ref for vm in vms}


def membership_changes(before: dict, after: dict) -> list[dict]:
    """Audit entries for members that joined or left: {flow: {vm#nic: why}} before and after."""
    changes = []
    for flow in sorted(set(before) | set(after)):
        old, new = before.get(flow, {}), after.get(flow, {})
        for member in sorted(new.keys() - old.keys()):
            changes.append({"flow": flow, "joined": member, "why": new[member]})
        for member in sorted(old.keys() - new.keys()):
            changes.append({"flow": flow, "left": member, "why": "no longer matches (or is gone)"})
    return changes
