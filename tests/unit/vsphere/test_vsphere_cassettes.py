"""Fast replays of the vsphere driver's recorded SOAP conversations (no simulator needed).

The cassettes were recorded from the live simulator by record.py; a replay passes only when
the driver asks exactly the recorded questions, in order, and gives the recorded answers.
"""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyVmomi", reason="pyvmomi missing: run scripts/setup --test")
pytest.importorskip("vcr", reason="vcrpy missing: run scripts/setup --test")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vsphere_cassette import CASSETTES, META, make_vcr  # noqa: E402
from vsphere_scenarios import SCENARIOS  # noqa: E402

RECORDED = json.loads(META.read_text())


def replay(name):
    from vtap_drivers.vsphere.driver import VsphereDriver

    meta = RECORDED[name]
    with make_vcr().use_cassette(str(CASSETTES / f"{name}.yaml"), record_mode="none") as cassette:
        driver = VsphereDriver(url=meta["url"], user=meta["user"], password="replayed", state_dir="/nonexistent")
        result = SCENARIOS[name](driver, meta)
        driver.close()
    return meta, result, cassette


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_replay_gives_the_recorded_outcome(name):
    meta, result, cassette = replay(name)
    assert result == meta["result"]
    assert cassette.all_played, f"{name}: the driver skipped recorded calls"


def reconfigures(cassette):
    return [r for r in cassette.requests if b"<ReconfigureDvs_Task" in (r.body or b"")]


def test_reapply_sends_one_reconfigure():
    _, result, cassette = replay("reapply_is_noop")
    assert len(reconfigures(cassette)) == 1
    assert [(b["session"], b["flow"]) for b in result["observed"]] == [("twice", "f1")]


def test_delete_sends_add_then_remove_and_leaves_nothing():
    _, result, cassette = replay("delete")
    bodies = [r.body for r in reconfigures(cassette)]
    assert [b"<operation>add</operation>" in b for b in bodies] == [True, False]
    assert b"<operation>remove</operation>" in bodies[1]
    assert result["observed"] == []


def test_erspan_session_on_the_wire():
    _, result, cassette = replay("create_erspan")
    (body,) = [r.body for r in reconfigures(cassette)]
    for field in (b"<name>vtap:web</name>", b"<encapType>erspan3</encapType>", b"<erspanId>42</erspanId>",
                  b"<mirroredPacketLength>96</mirroredPacketLength>", b"<sessionType>encapsulatedRemoteMirrorSource</sessionType>",
                  b"<ipAddress>192.0.2.7</ipAddress>"):
        assert field in body
    assert b"<sourcePortTransmitted></sourcePortTransmitted>" in body or b"<sourcePortTransmitted/>" in body  # direction out only


def test_no_password_in_cassettes():
    for path in CASSETTES.glob("*.yaml"):
        assert b"vcsim-secret" not in path.read_bytes()


def test_unknown_vm_is_not_found():
    _, result, _ = replay("unknown_vm")
    assert result["error"] == "NotFound" and "4b1d0000-0000-4000-8000-000000000000" in result["message"]
