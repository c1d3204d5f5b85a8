"""vtap vsphere driver: vDS port mirroring (VspanSession) through pyvmomi.

Import-cheap on purpose: pyvmomi is imported only by the driver module itself.
"""

# Connection settings, resolved by vtap_core.config (flag > environment > config file).
# The password never comes from argv: the CLI has no --password flag.
SETTINGS = {
    "url": "VTAP_VSPHERE_URL",
    "user": "VTAP_VSPHERE_USER",
    "password": "VTAP_VSPHERE_PASSWORD",
    "insecure": "VTAP_VSPHERE_INSECURE",
}
