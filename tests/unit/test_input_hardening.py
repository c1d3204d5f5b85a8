"""Input that looks almost right is refused at the model, naming the field (issue 9)."""

import pytest

from vtap_core.errors import ValidationError
from vtap_core.model import Source, TapFlow, TapSession, Target

UNDECODABLE = b"eth\xff".decode("utf-8", "surrogateescape")  # what Python makes of a non-UTF-8 argv byte


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: TapSession(name="web\n", target="port:mon0"), "session name"),
        (lambda: TapFlow(name="f1\n", session="web", source=Source(interface="eth0")), "flow name"),
        (lambda: TapSession(name="web", target="port:mon0", backend="tc\n"), "backend"),
        (lambda: Source(interface="eth0\n"), "interface"),
        (lambda: Source(interface=["eth0"]), "interface"),
        (lambda: Source(interface=UNDECODABLE), "interface"),
        (lambda: Source(vm="web" + UNDECODABLE), "vm"),
        (lambda: Source(vm="web\x00"), "vm"),
        (lambda: TapFlow(name="f1", session="web", source=Source(interface="eth0"), filter="tcp port 80\x00 or udp"), "filter"),
        (lambda: TapFlow(name="f1", session="web", source=Source(interface="eth0"), filter="tcp port 80 " + UNDECODABLE), "filter"),
        (lambda: Target.parse("port:" + UNDECODABLE), "target"),
        (lambda: Target.parse("pcap:/tmp/" + UNDECODABLE), "target"),
        (lambda: Target.parse("vxlan://192.0.2.1?vni=5&vni=6"), "target"),
        (lambda: Target.parse("vxlan://[fe80::1%eth0]?vni=5"), "target"),
        (lambda: Target.parse("vxlan://[fe80::1%25eth0]:4789?vni=5"), "target"),
        (lambda: TapSession(name="web", target="port:mon0", snaplen=float("inf")), "snaplen"),
    ],
    ids=lambda value: "" if callable(value) else value,
)
def test_almost_right_input_is_refused_naming_the_field(build, field):
    with pytest.raises(ValidationError) as refused:
        build()
    assert refused.value.field == field
    assert "\n" not in str(refused.value)


def test_repeated_query_keys_and_zone_ids_say_what_is_wrong():
    with pytest.raises(ValidationError, match="'vni' is given twice"):
        Target.parse("vxlan://192.0.2.1?vni=5&vni=6")
    with pytest.raises(ValidationError, match="zone id"):
        Target.parse("vxlan://[fe80::1%eth0]?vni=5")


def test_whitespace_in_a_filter_is_still_normalized():
    flow = TapFlow(name="f1", session="web", source=Source(interface="eth0"), filter="tcp\n\tport 80 ")
    assert flow.filter == "tcp port 80"
