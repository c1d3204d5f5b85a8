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

A Binding's spec is everything vtap sets on the session, read back from the
session itself by observe(): a session edited by someone else no longer
matches and is put right.

Which flow brought which ports is written in the session's description
("vtap flows: web-1 vm=UUID tx=12 rx=12; ..."), so that each flow has a binding
of its own that `vtap status` can show: observed when the description names it
and the session really mirrors its ports. Those flow bindings are marks only;
the session binding is what gets applied.
"""

from __future__ import annotations

from pyVmomi import vim

PREFIX = "vtap:"  # the mark: vtap only ever touches sessions named vtap:<session>
DESCRIPTION = "managed by vtap; changes are reverted"
FLOWS_MARK = " | vtap flows: "
VSPAN = vim.dvs.VmwareDistributedVirtualSwitch

DV_PORT_MIRROR = "dvPortMirror"
MIXED_DEST_MIRROR = "mixedDestMirror"
ENCAPSULATED = "encapsulatedRemoteMirrorSource"


def session_name(session: str) -> str:
    return PREFIX + session


def binding_key(switch_uuid: str, session: str) -> str:
    return f"vspan/{switch_uuid}/{session}"


def flow_key(switch_uuid: str, session: str, flow: str) -> str:
    return f"vspan/{switch_uuid}/{session}/{flow}"


def flow_entry(flow: str, vm: str, transmitted, received) -> tuple:
    return (flow, vm, tuple(sorted(transmitted)), tuple(sorted(received)))


def make_spec(session_type, transmitted=(), received=(), ports=(), uplinks=(), ips=(), encap=None, erspan_id=None, snaplen=None, sample=None, flows=()):
    return (
        ("type", session_type),
        ("transmitted", tuple(sorted(transmitted))),
        ("received", tuple(sorted(received))),
        ("destination_ports", tuple(sorted(ports))),
        ("destination_uplinks", tuple(sorted(uplinks))),
        ("destination_ips", tuple(sorted(ips))),
        ("encap", encap if session_type == ENCAPSULATED else None),
        ("erspan_id", erspan_id if encap in ("erspan2", "erspan3") else None),
        ("snaplen", snaplen or None),
        ("sample", sample if sample and sample > 1 else None),
        ("enabled", True),
        ("normal_traffic", False),
        ("flows", tuple(sorted(flows))),
    )


def describe_flows(flows) -> str:
    return "; ".join(f"{name} vm={vm} tx={','.join(tx)} rx={','.join(rx)}" for name, vm, tx, rx in flows)


def parse_flows(description) -> tuple:
    """The flow entries written by describe_flows; () when the text is not vtap's."""
    text = (description or "").partition(FLOWS_MARK)[2]
    entries = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        words = part.split()
        fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if len(words) != 4 or set(fields) != {"vm", "tx", "rx"}:
            return ()
        entries.append(flow_entry(words[0], fields["vm"], filter(None, fields["tx"].split(",")), filter(None, fields["rx"].split(","))))
    return tuple(sorted(entries))


def flow_bindings(switch_uuid: str, session: str, spec: dict) -> list:
    """The flow marks of a session: (key, flow, vm, flow spec) for each flow it really mirrors."""
    marks = []
    for name, vm, tx, rx in spec["flows"]:
        if set(tx) <= set(spec["transmitted"]) and set(rx) <= set(spec["received"]):
            marks.append((flow_key(switch_uuid, session, name), name, vm, (("transmitted", tx), ("received", rx))))
    return marks


def spec_of(session) -> tuple:
    """The spec a VMwareVspanSession realizes (the inverse of to_vspan)."""

    def keys(ports, attr):
        return tuple(getattr(ports, attr, None) or ()) if ports is not None else ()

    encap = session.encapType or ("gre" if session.sessionType == ENCAPSULATED else None)
    spec = dict(
        make_spec(
            session.sessionType,
            transmitted=keys(session.sourcePortTransmitted, "portKey"),
            received=keys(session.sourcePortReceived, "portKey"),
            ports=keys(session.destinationPort, "portKey"),
            uplinks=keys(session.destinationPort, "uplinkPortName"),
            ips=keys(session.destinationPort, "ipAddress"),
            encap=encap,
            erspan_id=session.erspanId or 0,  # 0 is omitted on the wire
            snaplen=session.mirroredPacketLength,
            sample=session.samplingRate,
            flows=parse_flows(session.description),
        )
    )
    spec["enabled"] = bool(session.enabled)
    spec["normal_traffic"] = bool(session.normalTrafficAllowed)
    return tuple(spec.items())


def port_keys(session) -> set:
    """Every distributed port a session uses, as source or destination."""
    keys = set()
    for ports in (session.sourcePortTransmitted, session.sourcePortReceived, session.destinationPort):
        keys.update(getattr(ports, "portKey", None) or () if ports is not None else ())
    return keys


def to_vspan(name: str, spec: dict, key: str | None = None):
    """A VMwareVspanSession carrying exactly this spec."""
    session = VSPAN.VspanSession(
        name=name,
        description=DESCRIPTION + FLOWS_MARK + describe_flows(spec["flows"]),
        enabled=spec["enabled"],
        sessionType=spec["type"],
        normalTrafficAllowed=spec["normal_traffic"],
        stripOriginalVlan=False,
        sourcePortTransmitted=VSPAN.VspanPorts(portKey=list(spec["transmitted"])),
        sourcePortReceived=VSPAN.VspanPorts(portKey=list(spec["received"])),
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
