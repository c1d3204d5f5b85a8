"""vtap linux driver: host interfaces as sources; the tc dataplane (dataplane.py) the kvm, proxmox and lab drivers reuse.

Import-cheap on purpose: the CLI reads SETTINGS before loading anything.
"""

# {setting: environment variable}: netns runs everything inside that named network namespace
# (how the tests play a host); unset, the host's own interfaces.
# datapath: tc (clsact + cls_bpf + mirred, the default) or tcx (one eBPF program per mirror on the
# tcx hook where the kernel and the filter allow; tcxmirror.py).
SETTINGS = {"netns": "VTAP_LINUX_NETNS", "datapath": "VTAP_DATAPATH"}
