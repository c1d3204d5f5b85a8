"""A vtap TapSession on one distributed switch <-> one VMwareVspanSession.

Direction, from the VM's point of view (vtap's words) to the vSphere API's
(VMwareVspanSession in the vSphere Web Services API reference):

    sourcePortTransmitted  "Source ports for which transmitted packets are mirrored."
    sourcePortReceived     "Source ports for which received packets are mirrored."

The ports are the switch's distributed ports, so transmitted/received are
the port's point of view, which is the reverse of the VM's:

    --direction out  (sent by the VM)      -> the port receives it    -> sourcePortReceived
    --direction in   (received by the VM)  -> the port transmits it   -> sourcePortTransmitted
    --direction both                       -> both lists

(The same reference says a wildcard source "has its receive traffic mirrored"
and is refused "on the transmit side": receive is what enters the switch.)

Bindings are per flow and switch: the session's options (type, destination,
encapsulation, snaplen, sample) plus the ports that flow brings. Which flow
brought which ports is written in the session's description ("vtap flows:
web-1 vm=UUID tx=12 rx=12; ..."). A flow's binding is observed when the
description names it and the session really mirrors its ports, with the
options read back from the session itself, so a session edited by someone
else no longer matches and is put right. One flow whose VM vanished is one
binding set aside; the session's other flows stay as they are.
"""

from __future__ import annotations

from pyVmomi import vim

PREFIX = "vtap:"  # the mark: vtap only ever touches sessions named vtap:<session>
DESCRIPTION = "managed by vtap; changes are reverted"
FLOWS_MARK = " | vtap flows: "
VSPAN = vim.dvs.VmwareDistributedVirtualSwitch

DV_PORT_MIRROR = "dvPortMirror"
REMOTE_MIRROR_SOURCE = "remoteMirrorSource"
ENCAPSULATED = "encapsulatedRemoteMirrorSource"
PORT_FIELDS = ("transmitted", "received", "exact")


def session_name(session: str) -> str:
    return PREFIX + session


def flow_key(switch_uuid: str, session: str, flow: str) -> str:
    return f"vspan/{switch_uuid}/{session}/{flow}"


def split_key(key: str) -> tuple:
    """(switch uuid, session, flow) of a flow_key."""
    _, uuid, session, flow = key.split("/", 3)
    return uuid, session, flow


def make_options(session_type, ports=(), uplinks=(), ips=(), encap=None, erspan_id=None, snaplen=None, sample=None) -> tuple:
    """What a session is apart from its sources."""
    return (
        ("type", session_type),
        ("destination_ports", tuple(sorted(ports))),
        ("destination_uplinks", tuple(sorted(uplinks))),
        ("destination_ips", tuple(sorted(ips))),
        ("encap", encap if session_type == ENCAPSULATED else None),
        ("erspan_id", erspan_id if encap in ("erspan2", "erspan3") else None),
        ("snaplen", snaplen or None),
        ("sample", sample if sample and sample > 1 else None),
        ("enabled", True),
        ("normal_traffic", False),
    )


def flow_spec(options: tuple, transmitted, received, exact=True) -> tuple:
    """A flow binding's spec; exact: the session mirrors no port that no flow asked for."""
    return options + (("transmitted", tuple(sorted(transmitted))), ("received", tuple(sorted(received))), ("exact", exact))


def options_of_spec(spec: tuple) -> tuple:
    return tuple((k, v) for k, v in spec if k not in PORT_FIELDS)


def entry(flow: str, vm: str, transmitted, received) -> tuple:
    return (flow, vm, tuple(sorted(transmitted)), tuple(sorted(received)))


def describe_flows(entries) -> str:
    return "; ".join(f"{name} vm={vm} tx={','.join(tx)} rx={','.join(rx)}" for name, vm, tx, rx in sorted(entries))


def parse_flows(description) -> tuple:
    """The flow entries written by describe_flows; () when the text is not vtap's."""
    text = (description or "").partition(FLOWS_MARK)[2]
    entries = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        words = part.split()
        fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if len(words) != 4 or set(fields) != {"vm", "tx", "rx"}:
            return ()
        entries.append(entry(words[0], fields["vm"], filter(None, fields["tx"].split(",")), filter(None, fields["rx"].split(","))))
    return tuple(sorted(entries))


def _keys(ports, attr="portKey") -> tuple:
    return tuple(getattr(ports, attr, None) or ()) if ports is not None else ()


def options_of(session) -> tuple:
    """The options a VMwareVspanSession realizes (the inverse of to_vspan's)."""
    encap = session.encapType or ("gre" if session.sessionType == ENCAPSULATED else None)
    options = dict(
        make_options(
            session.sessionType,
            ports=_keys(session.destinationPort),
            uplinks=_keys(session.destinationPort, "uplinkPortName"),
            ips=_keys(session.destinationPort, "ipAddress"),
            encap=encap,
            erspan_id=session.erspanId or 0,  # 0 is omitted on the wire
            snaplen=session.mirroredPacketLength,
            sample=session.samplingRate,
        )
    )
    options["enabled"] = bool(session.enabled)
    options["normal_traffic"] = bool(session.normalTrafficAllowed)
    return tuple(options.items())


def observed_flows(switch_uuid: str, session) -> list:
    """(key, session, flow, vm, spec) for each flow this vtap session really mirrors."""
    name = session.name[len(PREFIX):]
    options = options_of(session)
    transmitted, received = set(_keys(session.sourcePortTransmitted)), set(_keys(session.sourcePortReceived))
    entries = parse_flows(session.description)
    exact = transmitted == {k for e in entries for k in e[2]} and received == {k for e in entries for k in e[3]}
    return [
        (flow_key(switch_uuid, name, flow), name, flow, vm, flow_spec(options, tx, rx, exact))
        for flow, vm, tx, rx in entries
        if set(tx) <= transmitted and set(rx) <= received
    ]


def ours(sessions) -> dict:
    """{name: session} of vtap's sessions: its name prefix and its description mark.

    vCenter accepts two sessions with one name (a session is identified by its key), so a
    session someone else named vtap:<x> is never read, edited or removed. Should two carry
    vtap's mark under one name (a copy made by hand), the one with the lowest key is vtap's.
    """
    found = {}
    for session in sorted(sessions, key=lambda s: _key_order(s.key)):
        if (session.name or "").startswith(PREFIX) and (session.description or "").startswith(DESCRIPTION + FLOWS_MARK):
            found.setdefault(session.name, session)
    return found


def _key_order(key):
    digits = "".join(c for c in key or "" if c.isdigit())
    return (int(digits) if digits else 0, key or "")


def promiscuous_guarded(session) -> set:
    """Ports vSphere keeps from turning promiscuous: transmitted sources and destinations
    (VspanPortPromiscChangeFault); a received-only source may be promiscuous."""
    return set(_keys(session.sourcePortTransmitted)) | set(_keys(session.destinationPort))


def to_vspan(name: str, options: tuple, entries, key: str | None = None):
    """A VMwareVspanSession with these options mirroring exactly these flows' ports."""
    spec = dict(options)
    session = VSPAN.VspanSession(
        name=name,
        description=DESCRIPTION + FLOWS_MARK + describe_flows(entries),
        enabled=spec["enabled"],
        sessionType=spec["type"],
        normalTrafficAllowed=spec["normal_traffic"],
        stripOriginalVlan=False,
        sourcePortTransmitted=VSPAN.VspanPorts(portKey=sorted({k for e in entries for k in e[2]})),
        sourcePortReceived=VSPAN.VspanPorts(portKey=sorted({k for e in entries for k in e[3]})),
        destinationPort=VSPAN.VspanPorts(
            portKey=list(spec["destination_ports"]),
            uplinkPortName=list(spec["destination_uplinks"]),
            ipAddress=list(spec["destination_ips"]),
        ),
    )
    if key:
        session.key = key
    if spec["snaplen"]:
        session.mirroredPacketLength = spec["snaplen"]
    if spec["sample"]:
        session.samplingRate = spec["sample"]
    if spec["encap"]:
        session.encapType = spec["encap"]
    if spec["erspan_id"] is not None:
        session.erspanId = spec["erspan_id"]
    return session


def same(session, options: tuple, entries) -> bool:
    """Whether a VMwareVspanSession already is exactly to_vspan(options, entries)."""
    return (
        options_of(session) == options
        and parse_flows(session.description) == tuple(sorted(entries))
        and set(_keys(session.sourcePortTransmitted)) == {k for e in entries for k in e[2]}
        and set(_keys(session.sourcePortReceived)) == {k for e in entries for k in e[3]}
        and session.description == DESCRIPTION + FLOWS_MARK + describe_flows(entries)
    )
