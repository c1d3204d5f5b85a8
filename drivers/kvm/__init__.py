"""vtap kvm driver."""
