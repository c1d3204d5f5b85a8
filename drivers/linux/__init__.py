"""vtap linux driver: host interfaces as sources; the tc dataplane (dataplane.py) the kvm, proxmox and lab drivers reuse.

Import-cheap on purpose: the CLI reads SETTINGS before loading anything.
"""

# {setting: environment variable}: netns runs everything inside that named network namespace
# (how the tests play a host); unset, the host's own interfaces.
SETTINGS = {"netns": "VTAP_LINUX_NETNS"}
