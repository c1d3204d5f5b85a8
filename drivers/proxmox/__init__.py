"""vtap proxmox driver: taps on tap<vmid>i<n> by VM UUID, a node agent and a hookscript.

Import-cheap on purpose: the CLI reads SETTINGS without importing proxmoxer.
"""

# {setting: environment variable}; vtap_core.config resolves flag > environment > [proxmox] section.
# Secrets (password, token_value) come only from the environment or the config file, never argv.
SETTINGS = {
    "url": "VTAP_PROXMOX_URL",
    "user": "VTAP_PROXMOX_USER",
    "password": "VTAP_PROXMOX_PASSWORD",
    "token_name": "VTAP_PROXMOX_TOKEN_NAME",
    "token_value": "VTAP_PROXMOX_TOKEN_VALUE",
    "insecure": "VTAP_PROXMOX_INSECURE",
    "node": "VTAP_PROXMOX_NODE",
    # A CA bundle for a cluster with its own CA (PVE's /etc/pve/pve-root-ca.pem), instead of --insecure.
    "cafile": "VTAP_PROXMOX_CAFILE",
    # Where this node's tap<vmid>i<n> devices live: a network namespace name, or "node=netns,..."
    # (one namespace per node: how the tests play a cluster on one machine). Empty: the host itself.
    "netns": "VTAP_PROXMOX_NETNS",
    # The desired state every node reads (default /etc/pve/vtap/desired.json on a PVE node); see desired.py.
    "shared_state": "VTAP_PROXMOX_SHARED_STATE",
    # tc (clsact + cls_bpf + mirred, the default) or tcx (one eBPF program per mirror; drivers/linux/tcxmirror.py).
    "datapath": "VTAP_DATAPATH",
}
