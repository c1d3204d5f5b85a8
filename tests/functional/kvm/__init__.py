"""kvm functional tests: a package, so that its conftest never shadows another area's."""
