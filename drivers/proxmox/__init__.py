"""vtap proxmox driver."""
