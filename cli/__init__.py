"""The `vtap` command line: a thin layer over the SDK (vtap_core.client)."""
