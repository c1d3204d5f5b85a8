"""vtap lab driver: network namespaces playing hypervisor hosts and VMs (what `vtap demo` runs on)."""

SETTINGS = {"prefix": "VTAP_LAB_PREFIX"}
