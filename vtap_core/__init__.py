"""vtap core: the hypervisor-agnostic model, store, reconcile and follower.

Importing it must stay cheap: no driver (and so no pyvmomi, proxmoxer or
libvirt) is imported until one is asked for.
"""

__version__ = "0.1.0"
