# Base: the kernel tools' libraries, libpcap for filter compilation, vtap itself.
apt_install iproute2 libpcap0.8
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
pip_install -e .
if [ "$VTAP_SETUP_TEST" = 1 ]; then
    # tshark is the independent pcapng reader; iperf3 the throughput benchmark.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    # procps: sysctl, which the tests use to keep IPv6 chatter out of their namespaces.
    apt_install tshark tcpdump iperf3 procps
    pip_install pytest scapy
fi
