# kvm driver: libvirt-python (built against libvirt-dev), ovsdbapp, prometheus-client.
# Tests: libvirtd + QEMU (TCG guests), Open vSwitch (netdev datapath), and a
# Debian kernel + static busybox to build the tiny direct-boot guest.
apt_install libvirt-dev pkg-config gcc libvirt0
# libvirt-python is built from source: it needs the running Python's headers.
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || apt_install python3-dev
pip_install libvirt-python ovsdbapp prometheus-client tenacity
if [ "$VTAP_SETUP_TEST" = 1 ]; then
    # libvirt-daemon without -system: the tests start their own libvirtd (there is no systemd).
    apt_install libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 \
        openvswitch-switch linux-image-amd64 busybox-static
    # libvirtd's QEMU driver looks this account up at start even when qemu.conf
    # says user = "root" (libvirt-daemon-system would create it; we skip that package).
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd --system --gid libvirt-qemu \
        --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu
fi
