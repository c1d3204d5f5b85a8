"""The tc backend: vtap's Linux dataplane on a guest's host-side device.

The VM's point of view is turned into the device's here, once: what the VM
sends (`out`) arrives on the host device (ingress hook); what the VM receives
(`in`) leaves the host device (egress hook).
"""

from __future__ import annotations

from vtap_core.driver import Features
from vtap_core.errors import Unsupported

HOOKS = {"out": ("ingress",), "in": ("egress",), "both": ("ingress", "egress")}


class TcBackend:
    features = Features(targets=frozenset({"port", "vm"}), filter=True)

    def __init__(self, state_dir=None):
        self.state_dir = state_dir

    def check_session(self, session):
        raise Unsupported("kvm", "backend tc", "the Linux dataplane is not available yet")

    def plan_session(self, session, target_device):
        return []

    def plan_flow(self, session, flow, device, target_device, vm_uuid):
        return []

    def observe(self, devices):
        return []

    def apply(self, bindings):
        pass

    def remove(self, bindings):
        pass
