# vSphere: pyvmomi for the driver; for the tests, the govmomi simulator (built from Debian's
# govmomi sources in Go's GOPATH mode, no downloads) with this project's extension, and vcrpy.
pip_install pyvmomi
if [ "$VTAP_SETUP_TEST" = 1 ]; then
    apt_install golang-go golang-github-vmware-govmomi-dev
    pip_install vcrpy
    # Prebuild once; tests/vsphere/vcsim/run reuses the cached binary.
    tests/vsphere/vcsim/run --build-only
fi
