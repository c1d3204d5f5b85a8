"""vtap vsphere driver."""
