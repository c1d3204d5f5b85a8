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
"""

from __future__ import annotations

from pyVmomi import vim

PREFIX = "vtap:"  # the mark: vtap only ever touches sessions named vtap:<session>
DESCRIPTION = "managed by vtap; changes are reverted"
VSPAN = vim.dvs.VmwareDistributedVirtualSwitch

DV_PORT_MIRROR = "dvPortMirror"
MIXED_DEST_MIRROR = "mixedDestMirror"
ENCAPSULATED = "encapsulatedRemoteMirrorSource"


def session_name(session: str) -> str:
    return PREFIX + session


def binding_key(switch_uuid: str, session: str) -> str:
    return f"vspan/{switch_uuid}/{session}"


def make_spec(session_type, transmitted=(), received=(), ports=(), uplinks=(), ips=(), encap=None, erspan_id=None, snaplen=None, sample=None):
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
    )


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
        description=DESCRIPTION,
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
