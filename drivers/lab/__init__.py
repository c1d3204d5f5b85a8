"""vtap lab driver."""
