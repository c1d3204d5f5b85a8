"""vtap linux driver."""
