# Fleets: etcd3gw (the client of etcd's v3 JSON gateway) for `--store etcd://...`;
# for the tests, Debian's etcd-server (the tests start their own members on loopback ports).
pip_install etcd3gw
if [ "$VTAP_SETUP_TEST" = 1 ]; then
    apt_install etcd-server
fi
