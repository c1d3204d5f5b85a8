"""TapSession, TapFlow, Target and sources: the words every driver shares.

Everything is validated at construction; an invalid object cannot exist, so
nothing past this module needs to re-check syntax. Whether a platform can
realize a valid object is the driver's question (see driver.py).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
import uuid as uuidlib
from dataclasses import dataclass, field, fields, replace
from urllib.parse import parse_qsl, urlsplit

from vtap_core.errors import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}\Z")  # \Z: "$" would let a trailing newline in
NAME_RULE = "1-48 characters: letters, digits, '_', '.', '-', starting with a letter or digit"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
# Linux interface names; other platforms' port names are checked by their driver.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # tab, newline and carriage return are whitespace
PORT_NAME_RE = re.compile(r"^[^\s/:#?\x00-\x1f\x7f]{1,64}\Z")

VNI_MAX = (1 << 24) - 1
GRE_KEY_MAX = (1 << 32) - 1
ERSPAN_ID_MAX = (1 << 10) - 1
SNAPLEN_MAX = 65535
SAMPLE_MAX = 1 << 20
VXLAN_DEFAULT_PORT = 4789


def check_name(field_name: str, value) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(field_name, f"{value!r} is not a valid name ({NAME_RULE})")
    return value


def check_text(field_name: str, value) -> str:
    """A string that is valid Unicode (no lone surrogates, as undecodable command-line bytes become)
    and holds no control characters other than spaces, tabs and newlines."""
    if not isinstance(value, str):
        raise ValidationError(field_name, f"{value!r} is not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field_name, f"{value!r} is not valid UTF-8") from None
    if CONTROL_RE.search(value):
        raise ValidationError(field_name, f"{value!r} holds a control character")
    return value


@functools.lru_cache(maxsize=4096)  # thousands of stored flows share a few expressions
def _filter_text(value: str) -> str | None:
    """A flow's filter expression, whitespace collapsed (None if blank); raises ValidationError as check_text."""
    check_text("filter", value)  # libpcap would stop reading at a NUL: a different filter than stored
    return " ".join(value.split()) or None


def query_options(text: str, query: str, field_name: str = "target") -> dict:
    """URL query options as a dict; a key given twice (vni=5&vni=6) is an error, not "the last one wins"."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValidationError(field_name, f"{text!r}: malformed query string") from None
    options: dict = {}
    for key, value in pairs:
        if key in options:
            raise ValidationError(field_name, f"{text!r}: option {key!r} is given twice")
        options[key] = check_text(field_name, value)
    return options


def check_mac(field_name: str, value) -> str:
    text = str(value).strip().lower().replace("-", ":")
    if not MAC_RE.match(text):
        raise ValidationError(field_name, f"{value!r} is not a MAC address (six hex pairs, e.g. 52:54:00:12:34:56)")
    return text


def parse_uuid(value) -> str | None:
    """The canonical form of a UUID, or None when the text is not one."""
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        return None


def check_int(field_name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValidationError(field_name, f"{value!r} is not a whole number from {low} to {high}")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: YAML's .inf
        raise ValidationError(field_name, f"{value!r} is not a whole number from {low} to {high}") from None
    if str(number) != str(value).strip() and not isinstance(value, int):
        raise ValidationError(field_name, f"{value!r} is not a whole number from {low} to {high}")
    if not low <= number <= high:
        raise ValidationError(field_name, f"{number} is out of range {low}..{high}")
    return number


class Direction(str, enum.Enum):
    """For a VM: its own point of view (out = sent by the VM).

    For a host interface: the interface's point of view, as `tcpdump -Q`.
    """

    IN = "in"
    OUT = "out"
    BOTH = "both"

    @classmethod
    def parse(cls, value) -> "Direction":
        if value.__class__ is cls:
            return value
        found = cls._value2member_map_.get(value) if value.__class__ is str else None
        if found is not None:  # the usual case, without Enum's call machinery: a store read parses thousands
            return found
        try:
            return cls(str(value))
        except ValueError:
            raise ValidationError("direction", f"{value!r} is not one of in, out, both") from None

    def includes(self, one: "Direction") -> bool:
        return self is Direction.BOTH or self is one

    def __str__(self):
        return self.value


# ---------------------------------------------------------------- targets

TARGET_GRAMMAR = "port:IFNAME, vm:UUID[#MAC][?encap=erspan], vxlan://HOST[:PORT]?vni=N, gre://HOST?key=N, erspan://HOST?version=2|3&id=N, pcap:PATH[?max_size=BYTES&max_files=K] (tunnels also take &local=ADDR)"
PCAP_ROTATION_RULE = f"pcap:PATH?max_size=BYTES&max_files=K rotates the file (both options; BYTES {4096}..{2**50}, K 1..{10**5})"


@dataclass(frozen=True)
class Target:
    """Where copies go. Build one with Target.parse(text)."""

    kind: str  # port | vm | vxlan | gre | erspan | pcap
    port: str | None = None  # port: the interface (or platform port) name
    vm: str | None = None  # vm: the monitoring VM's UUID
    mac: str | None = None  # vm: one NIC of it
    host: str | None = None  # tunnels: the remote end (IP address or host name)
    udp_port: int | None = None  # vxlan
    vni: int | None = None  # vxlan
    key: int | None = None  # gre
    version: int | None = None  # erspan: 2 (type II) or 3 (type III)
    erspan_id: int | None = None  # erspan session id
    path: str | None = None  # pcap
    local: str | None = None  # tunnels: the source address (None: the kernel picks by route)
    encap: str | None = None  # vm: "erspan" lets a driver reach a monitoring VM on another host by ERSPAN to its IP (vsphere)
    max_size: int | None = None  # pcap: rotate the file when it would grow beyond this many bytes
    max_files: int | None = None  # pcap: the current file and at most max_files-1 older ones (PATH.1 ...)

    @property
    def is_tunnel(self) -> bool:
        return self.kind in ("vxlan", "gre", "erspan")

    def __str__(self) -> str:
        if self.kind == "port":
            return f"port:{self.port}"
        if self.kind == "vm":
            return f"vm:{self.vm}" + (f"#{self.mac}" if self.mac else "") + (f"?encap={self.encap}" if self.encap else "")
        if self.kind == "pcap":
            rotation = f"?max_size={self.max_size}&max_files={self.max_files}" if self.max_size else ""
            return f"pcap:{self.path}{rotation}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        local = f"local={self.local}" if self.local else ""
        if self.kind == "vxlan":
            return f"vxlan://{host}:{self.udp_port}?vni={self.vni}" + (f"&{local}" if local else "")
        if self.kind == "gre":
            query = "&".join(q for q in (f"key={self.key}" if self.key is not None else "", local) if q)
            return f"gre://{host}" + (f"?{query}" if query else "")
        return f"erspan://{host}?version={self.version}&id={self.erspan_id}" + (f"&{local}" if local else "")

    @classmethod
    def parse(cls, text) -> "Target":
        if isinstance(text, Target):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValidationError("target", f"{text!r} is empty; allowed: {TARGET_GRAMMAR}")
        text = check_text("target", text.strip())
        scheme, sep, rest = text.partition(":")
        if not sep:
            raise ValidationError("target", f"{text!r} has no scheme; allowed: {TARGET_GRAMMAR}")
        if scheme == "port":
            if not PORT_NAME_RE.match(rest):
                raise ValidationError("target", f"{text!r}: port needs an interface or port name (port:IFNAME)")
            return cls("port", port=rest)
        if scheme == "vm":
            rest, query, options = rest.partition("?")
            vm, _, mac = rest.partition("#")
            canonical = parse_uuid(vm)
            if canonical is None or vm.count("-") != 4:
                raise ValidationError("target", f"{text!r}: vm needs a VM UUID (vm:UUID[#MAC][?encap=erspan])")
            if query and options != "encap=erspan":
                raise ValidationError("target", f"{text!r}: the only vm option is ?encap=erspan (ERSPAN to a monitoring VM on another host)")
            return cls("vm", vm=canonical, mac=check_mac("target", mac) if mac else None, encap="erspan" if options else None)
        if scheme == "pcap":
            return cls._parse_pcap(text, rest)
        if scheme in ("vxlan", "gre", "erspan"):
            return cls._parse_tunnel(text, scheme)
        raise ValidationError("target", f"{text!r}: unknown scheme {scheme!r}; allowed: {TARGET_GRAMMAR}")

    @classmethod
    def _parse_pcap(cls, text: str, rest: str) -> "Target":
        """pcap:PATH, or pcap:PATH?max_size=N&max_files=K (a '?' without options stays in the path)."""
        path, sep, query = rest.rpartition("?")
        if not sep or "=" not in query:
            path, query = rest, ""
        if not path or "\0" in path:
            raise ValidationError("target", f"{text!r}: pcap needs a file path (pcap:PATH)")
        if not query:
            return cls("pcap", path=path)
        try:
            options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            raise ValidationError("target", f"{text!r}: malformed options; {PCAP_ROTATION_RULE}") from None
        if set(options) != {"max_size", "max_files"}:
            raise ValidationError("target", f"{text!r}: {PCAP_ROTATION_RULE}")
        max_size = check_int("target max_size", options["max_size"], 4096, 2**50)
        max_files = check_int("target max_files", options["max_files"], 1, 10**5)
        return cls("pcap", path=path, max_size=max_size, max_files=max_files)

    @classmethod
    def _parse_tunnel(cls, text: str, scheme: str) -> "Target":
        try:
            url = urlsplit(text)
            host = url.hostname
            udp_port = url.port
        except ValueError as exc:
            raise ValidationError("target", f"{text!r} is not a valid URL: {exc}") from None
        if not url.netloc.startswith("//") and not text.startswith(f"{scheme}://"):
            raise ValidationError("target", f"{text!r}: write {scheme}://HOST...")
        if not host or not _valid_host(host):
            raise ValidationError("target", f"{text!r}: {host or ''!r} is not an IP address or host name")
        if url.path not in ("", "/") or url.fragment or url.username or url.password:
            raise ValidationError("target", f"{text!r}: only HOST[:PORT] and query options are allowed")
        query = query_options(text, url.query)
        allowed = {"vxlan": {"vni", "local"}, "gre": {"key", "local"}, "erspan": {"version", "id", "local"}}[scheme]
        unknown = set(query) - allowed
        if unknown:
            raise ValidationError("target", f"{text!r}: unknown option {sorted(unknown)[0]!r}; {scheme} takes {', '.join(sorted(allowed))}")
        local = _tunnel_local(text, host, query.get("local"))
        if scheme == "vxlan":
            if "vni" not in query:
                raise ValidationError("target", f"{text!r}: vxlan needs ?vni=N (0..{VNI_MAX})")
            return cls(
                "vxlan",
                host=host,
                udp_port=VXLAN_DEFAULT_PORT if udp_port is None else check_int("target port", udp_port, 1, 65535),
                vni=check_int("target vni", query["vni"], 0, VNI_MAX),
                local=local,
            )
        if udp_port is not None:
            raise ValidationError("target", f"{text!r}: {scheme} has no port")
        if scheme == "gre":
            key = query.get("key")
            return cls("gre", host=host, key=None if key is None else check_int("target key", key, 0, GRE_KEY_MAX), local=local)
        if "id" not in query:
            raise ValidationError("target", f"{text!r}: erspan needs &id=N (0..{ERSPAN_ID_MAX})")
        version = query.get("version", "2")
        if version not in ("2", "3"):
            raise ValidationError("target version", f"{version!r} is not 2 or 3 (ERSPAN type II or III)")
        return cls("erspan", host=host, version=int(version), erspan_id=check_int("target id", query["id"], 0, ERSPAN_ID_MAX), local=local)


def _tunnel_local(text: str, host: str, local: str | None) -> str | None:
    """The local= source address of a tunnel: an IP address, of the same family as an IP address HOST."""
    if local is None:
        return None
    try:
        address = ipaddress.ip_address(local)
    except ValueError:
        raise ValidationError("target local", f"{local!r} in {text!r} is not an IP address (local=ADDR is the tunnel's source address)") from None
    try:
        remote = ipaddress.ip_address(host)
    except ValueError:
        return str(address)  # a host name: the family is checked once it is resolved
    if remote.version != address.version:
        raise ValidationError("target local", f"{local!r} in {text!r} is IPv{address.version} and the remote end is IPv{remote.version}: use one family")
    return str(address)


def _valid_host(host: str) -> bool:
    if "%" in host:
        raise ValidationError("target", f"{host!r}: an IPv6 zone id (%IFACE) is not supported in a tunnel target; give a global address")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.match(host)) and not host.replace(".", "").isdigit()


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """What a flow mirrors: a VM (UUID or name, optionally one NIC), a host interface,
    or every VM a selector expression matches (see selectors.py)."""

    vm: str | None = None
    nic: str | None = None
    interface: str | None = None
    select: str | None = None

    def __post_init__(self):
        if sum(bool(x) for x in (self.vm, self.interface, self.select)) != 1:
            raise ValidationError("source", "give exactly one of --vm UUID|NAME, --interface IFNAME or --select EXPR")
        if self.interface is not None and not (isinstance(self.interface, str) and PORT_NAME_RE.match(self.interface) and self.interface.isprintable()):
            raise ValidationError("interface", f"{self.interface!r} is not an interface name")
        if self.nic is not None and not self.vm:
            raise ValidationError("nic", "--nic goes with --vm only")
        if self.select is not None:
            from vtap_core.selectors import canonical

            object.__setattr__(self, "select", canonical(self.select))
        if self.vm is not None:
            canonical_uuid = parse_uuid(self.vm)
            if canonical_uuid is not None and self.vm.count("-") == 4:
                object.__setattr__(self, "vm", canonical_uuid)
            elif not isinstance(self.vm, str) or not self.vm.strip() or len(self.vm) > 128:
                raise ValidationError("vm", f"{self.vm!r} is not a VM UUID or name")
            else:
                check_text("vm", self.vm)
        if self.nic is not None:
            object.__setattr__(self, "nic", check_mac("nic", self.nic))

    @property
    def vm_uuid(self) -> str | None:
        """The VM's UUID when the user gave one (else a name to resolve)."""
        return self.vm if self.vm and parse_uuid(self.vm) == self.vm else None

    def __str__(self) -> str:
        if self.interface:
            return f"interface {self.interface}"
        if self.select:
            return f"select {self.select}"
        return f"vm {self.vm}" + (f" nic {self.nic}" if self.nic else "")


# ---------------------------------------------------------------- session and flow


@dataclass(frozen=True)
class TapSession:
    """One named mirror: one Target and its options."""

    name: str
    target: Target
    snaplen: int | None = None
    sample: int | None = None  # 1-in-N
    enabled: bool = True
    backend: str | None = None  # a driver's data path, when it has several (kvm: tc|ovs)

    def __post_init__(self):
        check_name("session name", self.name)
        object.__setattr__(self, "target", Target.parse(self.target))
        if self.snaplen is not None:
            object.__setattr__(self, "snaplen", check_int("snaplen", self.snaplen, 1, SNAPLEN_MAX))
        if self.sample is not None:
            object.__setattr__(self, "sample", check_int("sample", self.sample, 1, SAMPLE_MAX))
        if not isinstance(self.enabled, bool):
            raise ValidationError("enabled", f"{self.enabled!r} is not true or false")
        if self.backend is not None and not NAME_RE.match(str(self.backend)):
            raise ValidationError("backend", f"{self.backend!r} is not a backend name")

    def to_dict(self) -> dict:
        data = {"name": self.name, "to": str(self.target)}
        for key in ("snaplen", "sample", "backend"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data["enabled"] = self.enabled
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TapSession":
        data = dict(data)
        return cls(name=data.pop("name", None), target=data.pop("to", None), **data)


@dataclass(frozen=True)
class TapFlow:
    """One source inside a session: what to copy, which way, which packets."""

    name: str
    session: str
    source: Source
    direction: Direction = Direction.BOTH
    filter: str | None = None  # a pcap filter expression (tcpdump syntax)
    host: str | None = None  # interface flows in a fleet: the host whose interface it is (a VM's host is found by its UUID)

    def __post_init__(self):
        check_name("flow name", self.name)
        check_name("session name", self.session)
        object.__setattr__(self, "direction", Direction.parse(self.direction))
        if self.host is not None:
            if not self.source.interface:
                raise ValidationError("host", "only an interface flow names a host (a VM is found on whichever host runs it)")
            if not isinstance(self.host, str) or not (NAME_RE.match(self.host) or HOSTNAME_RE.match(self.host)):
                raise ValidationError("host", f"{self.host!r} is not a host name (a DNS name, or {NAME_RULE})")
        if self.filter is not None:
            if not isinstance(self.filter, str):
                raise ValidationError("filter", f"{self.filter!r} is not a pcap filter expression")
            object.__setattr__(self, "filter", _filter_text(self.filter))

    def to_dict(self) -> dict:
        data = {"name": self.name, "session": self.session}
        for key in ("vm", "nic", "interface", "select"):
            if getattr(self.source, key) is not None:
                data[key] = getattr(self.source, key)
        data["direction"] = self.direction.value
        if self.filter:
            data["filter"] = self.filter
        if self.host:
            data["host"] = self.host
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TapFlow":
        data = dict(data)
        source = Source(vm=data.pop("vm", None), nic=data.pop("nic", None), interface=data.pop("interface", None), select=data.pop("select", None))
        return cls(source=source, **data)


@dataclass(frozen=True)
class MemberFlow(TapFlow):
    """One (VM, NIC) a selector flow taps now: planned like a single-VM flow.

    Its name, FLOW@UUID[#MAC], is made here, never typed by a user, so it is not
    held to the name rule; `parent` is the selector flow's name.
    """

    parent: str = ""

    def __post_init__(self):
        pass  # built from a validated flow and an inventory UUID/MAC


def member_name(flow_name: str, vm_ref: str, mac: str | None) -> str:
    return f"{flow_name}@{vm_ref}" + (f"#{mac}" if mac else "")


def member_flow(flow: TapFlow, vm_uuid: str, mac: str | None) -> MemberFlow:
    name = member_name(flow.name, vm_uuid, mac)
    return MemberFlow(name=name, session=flow.session, source=Source(vm=vm_uuid, nic=mac), direction=flow.direction, filter=flow.filter, parent=flow.name)


def parent_of(flow_name: str | None) -> str | None:
    """The selector flow a member flow's name belongs to (the name itself otherwise)."""
    return flow_name.split("@", 1)[0] if flow_name else flow_name


def evolve(obj, **changes):
    """A copy of a frozen model object with some fields changed (validated again)."""
    return replace(obj, **changes)


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


# ---------------------------------------------------------------- inventory


@dataclass(frozen=True)
class Nic:
    mac: str
    device: str | None = None  # host-side device (vnetN, tapNiM) or platform port key
    network: str | None = None  # bridge, network, portgroup
    details: dict = field(default_factory=dict, compare=False, hash=False)


def nic_networks(nic: Nic) -> list[str]:
    """The names a NIC's network goes by (id, and a display name where the platform has one)."""
    return [v for v in (nic.network, nic.details.get("network_name")) if v]


@dataclass(frozen=True)
class VM:
    uuid: str
    name: str
    state: str
    host: str | None = None
    nics: tuple[Nic, ...] = ()
    details: dict = field(default_factory=dict, compare=False, hash=False)
    tags: tuple[str, ...] = ()  # vSphere tags/custom attributes, libvirt vtap metadata, Proxmox tags
    folder: str | None = None  # vsphere: inventory path of the VM's folder
    pool: str | None = None  # proxmox: resource pool

    @property
    def ref(self) -> str:
        """What a flow names this VM by: its UUID, else the platform's own id (a Proxmox vmid), else its name."""
        return self.uuid or str(self.details.get("vmid") or self.name)

    def fact(self, key: str) -> list:
        """The values a selector key matches (selectors.py); [] for a key this VM has no value of.

        A platform that knows hosts and networks by id and by name (vsphere) puts the
        names in details["host_name"] and the NIC's details["network_name"]: both match.
        """
        if key == "name":
            return [self.name]
        if key == "tag":
            return list(self.tags)
        if key == "host":
            return [v for v in (self.host, self.details.get("host_name")) if v]
        if key == "network":
            return [v for n in self.nics for v in nic_networks(n)]
        value = getattr(self, key, None) if key in ("folder", "pool") else None
        return [value] if value else []

    def facts(self) -> dict:
        return {key: self.fact(key) for key in ("name", "tag", "folder", "pool", "host", "network")}

    def to_dict(self) -> dict:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "state": self.state,
            "host": self.host,
            "nics": [{"mac": n.mac, "device": n.device, "network": n.network, **n.details} for n in self.nics],
            **({"tags": list(self.tags)} if self.tags else {}),
            **({"folder": self.folder} if self.folder else {}),
            **({"pool": self.pool} if self.pool else {}),
            **self.details,
        }
