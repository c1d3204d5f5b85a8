# Proxmox VE: proxmoxer (with requests) for the driver; for the tests, fakepve (a fake PVE API
# derived from PVE's own schema) and cryptography for its self-signed certificate.
pip_install proxmoxer requests
if [ "$VTAP_SETUP_TEST" = 1 ]; then
    pip_install fakepve==0.5.0 cryptography
fi
