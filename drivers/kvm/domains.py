"""libvirt domain XML -> vtap's VM and Nic (what `vtap vm list` shows).

Pure parsing, no connection: the driver hands it XMLDesc() text.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from vtap_core.model import VM, Nic

# vtap's own metadata element: <metadata><vtap:tags xmlns:vtap="urn:vtap:1"><vtap:tag>pci</vtap:tag>...
# (virsh metadata DOM urn:vtap:1 --key vtap --set '<tags><tag>pci</tag></tags>'). Words written
# #like-this in <title> or <description> count as tags too.
VTAP_NS = "urn:vtap:1"
HASHTAG_RE = re.compile(r"(?<![\w#])#([A-Za-z0-9][A-Za-z0-9_.:-]*)")

# virDomainState numbers -> words (libvirt.VIR_DOMAIN_*), without importing libvirt.
STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended"}
ACTIVE_STATES = {"running", "blocked", "paused"}


def nics_of(xml) -> tuple[Nic, ...]:
    root = ET.fromstring(xml) if isinstance(xml, str) else xml
    nics = []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        if mac is None:
            continue
        source = iface.find("source")
        target = iface.find("target")
        network = None
        if source is not None:
            network = source.get("bridge") or source.get("network") or source.get("dev")
        details = {"type": iface.get("type")}
        virtualport = iface.find("virtualport")
        if virtualport is not None:
            details["virtualport"] = virtualport.get("type")
            params = virtualport.find("parameters")
            if params is not None and params.get("interfaceid"):
                details["interfaceid"] = params.get("interfaceid")
        nics.append(
            Nic(
                mac=mac.get("address").lower(),
                device=target.get("dev") if target is not None else None,
                network=network,
                details=details,
            )
        )
    return tuple(nics)


def tags_of(xml) -> tuple[str, ...]:
    """Tags from vtap's metadata element, then #tags in the title and description (in order, once each)."""
    root = ET.fromstring(xml) if isinstance(xml, str) else xml
    found = [(el.text or "").strip() for el in root.iterfind(f"./metadata//{{{VTAP_NS}}}tag")]
    for part in ("title", "description"):
        found.extend(HASHTAG_RE.findall(root.findtext(part) or ""))
    return tuple(dict.fromkeys(t for t in found if t))


def vm_of(uuid: str, name: str, state: int, xml: str, host: str | None = None) -> VM:
    word = STATES.get(state, "unknown")
    root = ET.fromstring(xml)
    nics = nics_of(root)
    if word not in ACTIVE_STATES:
        # An inactive domain's XML may still name an old vnetN: it is not its device now.
        nics = tuple(Nic(mac=n.mac, device=None, network=n.network, details=n.details) for n in nics)
    return VM(uuid=uuid, name=name, state=word, host=host, nics=nics, tags=tags_of(root))
