"""The model refuses invalid input at construction, naming the field and the rule."""

import pytest

from vtap_core.errors import ValidationError
from vtap_core.model import Direction, Source, TapFlow, TapSession, Target

UUID = "6f1c1b2e-0c4e-4c1e-9a55-7a2d3c0f7a10"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("port:mon0", Target("port", port="mon0")),
        (f"vm:{UUID.upper()}", Target("vm", vm=UUID)),
        (f"vm:{UUID}#52-54-00-AA-BB-CC", Target("vm", vm=UUID, mac="52:54:00:aa:bb:cc")),
        ("vxlan://192.0.2.1?vni=42", Target("vxlan", host="192.0.2.1", udp_port=4789, vni=42)),
        ("vxlan://[2001:db8::1]:8472?vni=16777215", Target("vxlan", host="2001:db8::1", udp_port=8472, vni=16777215)),
        ("vxlan://collector.example?vni=0", Target("vxlan", host="collector.example", udp_port=4789, vni=0)),
        ("gre://192.0.2.9?key=7", Target("gre", host="192.0.2.9", key=7)),
        ("gre://192.0.2.9", Target("gre", host="192.0.2.9")),
        ("erspan://192.0.2.9?version=3&id=1023", Target("erspan", host="192.0.2.9", version=3, erspan_id=1023)),
        ("erspan://192.0.2.9?id=5", Target("erspan", host="192.0.2.9", version=2, erspan_id=5)),
        ("gre://[2001:db8::9]?key=7&local=2001:db8::1", Target("gre", host="2001:db8::9", key=7, local="2001:db8::1")),
        ("erspan://192.0.2.9?id=5&local=192.0.2.1", Target("erspan", host="192.0.2.9", version=2, erspan_id=5, local="192.0.2.1")),
        ("vxlan://[2001:db8::9]?vni=5&local=2001:db8::1", Target("vxlan", host="2001:db8::9", udp_port=4789, vni=5, local="2001:db8::1")),
        ("pcap:/tmp/x.pcapng", Target("pcap", path="/tmp/x.pcapng")),
        ("pcap:/tmp/x.pcapng?max_size=1000000&max_files=5", Target("pcap", path="/tmp/x.pcapng", max_size=1000000, max_files=5)),
        ("pcap:/tmp/what?.pcapng", Target("pcap", path="/tmp/what?.pcapng")),  # no options: '?' is part of the path
    ],
)
def test_target_grammar(text, expected):
    target = Target.parse(text)
    assert target == expected
    assert Target.parse(str(target)) == target


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("mon0", "no scheme"),
        ("ftp://x", "unknown scheme"),
        ("port:", "port needs"),
        ("vm:not-a-uuid", "vm needs a VM UUID"),
        ("vm:" + UUID + "#zz", "not a MAC"),
        ("vxlan://192.0.2.1", "needs ?vni"),
        ("vxlan://192.0.2.1?vni=16777216", "out of range"),
        ("vxlan://192.0.2.1?vni=-1", "out of range"),
        ("vxlan://192.0.2.1?vni=ten", "not a whole number"),
        ("vxlan://192.0.2.1:70000?vni=1", "not a valid URL"),
        ("vxlan://192.0.2.1?vni=1&colour=red", "unknown option 'colour'"),
        ("vxlan://?vni=1", "not an IP address or host name"),
        ("vxlan://bad_host?vni=1", "not an IP address or host name"),
        ("vxlan://192.0.2.1/path?vni=1", "only HOST"),
        ("gre://192.0.2.1:99", "gre has no port"),
        ("gre://192.0.2.1?key=4294967296", "out of range"),
        ("erspan://192.0.2.1?version=2", "needs &id"),
        ("erspan://192.0.2.1?version=4&id=1", "not 2 or 3"),
        ("erspan://192.0.2.1?id=1024", "out of range"),
        ("gre://192.0.2.1?local=2001:db8::1", "use one family"),
        ("vxlan://192.0.2.1?vni=1&local=myhost", "not an IP address"),
        ("pcap:", "pcap needs"),
        ("pcap:?max_size=4096&max_files=2", "pcap needs a file path"),
        ("pcap:/tmp/x?max_size=4096", "max_files=K rotates the file (both options"),
        ("pcap:/tmp/x?max_size=4096&max_files=2&colour=red", "rotates the file"),
        ("pcap:/tmp/x?max_size=100&max_files=2", "out of range 4096"),
        ("pcap:/tmp/x?max_size=4096&max_files=0", "out of range 1"),
        ("pcap:/tmp/x?max_size=1M&max_files=2", "not a whole number"),
        ("pcap:/tmp/x?max_size=4096&&max_files=2", "malformed options"),
    ],
)
def test_bad_targets_name_the_rule(text, words):
    with pytest.raises(ValidationError) as err:
        Target.parse(text)
    assert err.value.field.startswith("target")
    assert words in str(err.value)


def test_session_validation():
    session = TapSession("web-1", "port:mon0", snaplen="128", sample=10)
    assert session.snaplen == 128 and session.sample == 10
    assert TapSession.from_dict(session.to_dict()) == session
    for kwargs, words in [
        ({"name": "-x"}, "session name"),
        ({"name": "a" * 49}, "session name"),
        ({"snaplen": 0}, "snaplen: 0 is out of range"),
        ({"snaplen": "12x"}, "snaplen: '12x' is not a whole number"),
        ({"sample": 0}, "sample: 0 is out of range"),
        ({"enabled": "yes"}, "enabled"),
    ]:
        with pytest.raises(ValidationError, match=words):
            TapSession(**{"name": "ok", "target": "port:mon0", **kwargs})


def test_flow_and_source():
    flow = TapFlow("f1", "web", Source(vm=UUID.upper(), nic="52:54:00:AA:BB:CC"), "out", "  tcp   port 80 ")
    assert flow.source.vm == UUID and flow.source.vm_uuid == UUID
    assert flow.source.nic == "52:54:00:aa:bb:cc"
    assert flow.direction is Direction.OUT and flow.filter == "tcp port 80"
    assert TapFlow.from_dict(flow.to_dict()) == flow
    assert Source(vm="web-server").vm_uuid is None
    with pytest.raises(ValidationError, match="exactly one of"):
        Source()
    with pytest.raises(ValidationError, match="exactly one of"):
        Source(vm="a", interface="eth0")
    with pytest.raises(ValidationError, match="--nic goes with --vm"):
        Source(interface="eth0", nic="52:54:00:aa:bb:cc")
    with pytest.raises(ValidationError, match="direction: 'sideways' is not one of in, out, both"):
        TapFlow("f1", "web", Source(interface="eth0"), "sideways")


def test_direction_includes():
    assert Direction.BOTH.includes(Direction.IN) and Direction.BOTH.includes(Direction.OUT)
    assert Direction.IN.includes(Direction.IN) and not Direction.IN.includes(Direction.OUT)
