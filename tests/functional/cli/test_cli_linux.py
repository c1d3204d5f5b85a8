"""The `vtap` command line with the linux driver, against a real kernel in a fresh namespace."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from datapaths import on_both_datapaths
from vtap_drivers.lab.traffic import Sniffer, send, tcp_frame, udp_frame

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def frames(n, dport, maker=tcp_frame):
    return [maker(A, B, "10.1.0.1", "10.1.0.2", 40000 + i, dport) for i in range(n)]


@on_both_datapaths
def test_filtered_mirror_end_to_end(host):
    out = host.vtap_ok("session", "create", "web", "--to", "port:mon0")
    assert "session web created" in out
    out = host.vtap_ok("flow", "add", "web", "--interface", "eth0", "--direction", "in", "--filter", "tcp dst port 80")
    assert "flow web-1 added" in out
    sniffer = Sniffer(host.name, "monpeer")
    try:
        # Sent into wire0 = received by eth0 = direction in of eth0.
        send(host.name, "wire0", frames(7, 80) + frames(5, 443) + frames(4, 80, udp_frame))
        counts = sniffer.settle()
    finally:
        sniffer.close()
    assert counts[(A, "tcp/80")] == 7
    assert sum(counts.values()) == 7
    status = json.loads(host.vtap_ok("-o", "json", "status"))
    assert status[0]["state"] == "active" and status[0]["packets"] == 7
    assert json.loads(host.vtap_ok("flow", "list", "-o", "json"))[0]["filter"] == "tcp dst port 80"
    audit = json.loads(host.vtap_ok("-o", "json", "audit"))
    assert [row["command"].split("vtap.db ", 1)[1] for row in audit] == [
        "session create web --to port:mon0",
        "flow add web --interface eth0 --direction in --filter 'tcp dst port 80'",
    ]
    assert audit[0]["user"] == "root" and audit[1]["change"]["added flow"]["filter"] == "tcp dst port 80"
    host.vtap_ok("session", "delete", "web")
    assert host.filters("eth0", "ingress") == []
    assert "clsact" not in json.dumps(host.kernel()["qdiscs"])


BAD_INPUTS = [
    (["flow", "add", "base", "--interface", "eth0", "--filter", "tcp port eighty"], "filter"),
    (["flow", "add", "base", "--interface", "nosuch0"], "nosuch0"),
    (["session", "create", "s2", "--to", "vxlan://10.0.0.1:port?vni=1"], "target"),
    (["session", "create", "s2", "--to", "vxlan://10.0.0.1?vni=16777216"], "vni"),
    (["session", "create", "s2", "--to", "port:mon0", "--snaplen", "96"], "snaplen"),
    (["session", "create", "base", "--to", "port:mon0"], "already exists"),
    (["flow", "add", "base", "--interface", "eth0", "--name", "base-1"], "already exists"),
    (["session", "delete", "nosuch"], "does not exist"),
    (["flow", "delete", "nosuch"], "does not exist"),
    (["flow", "add", "nosuch", "--interface", "eth0"], "does not exist"),
    (["flow", "add", "base", "--interface", "eth0", "--direction", "sideways"], "direction"),
    (["session", "create", "s2", "--to", "gre://10.0.0.1?key=1"], "gre"),
    (["session", "create", "s2", "--to", "erspan://10.0.0.1?id=1&local=fd00::1"], "use one family"),
    (["session", "create", "s2", "--to", "vxlan://10.0.0.1?vni=1&local=nohost"], "not an IP address"),
    (["session", "create", "s2", "--to", "pcap:/tmp/vtap-s2.pcapng?max_size=4096"], "max_files=K rotates the file"),
    (["session", "create", "s2", "--to", "pcap:/tmp/vtap-s2.pcapng?max_size=10&max_files=2"], "out of range 4096"),
]


@on_both_datapaths
def test_bad_input_changes_nothing(host, tmp_path):
    host.vtap_ok("session", "create", "base", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "base", "--interface", "eth0", "--filter", "udp")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sessions:\n  - name: y\n    to: port:mon0\n    colour: red\n")
    cases = BAD_INPUTS + [(["apply", "-f", str(bad_yaml)], "colour")]
    store, kernel = host.store(), host.kernel()
    for args, words in cases:
        result = host.vtap(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, result.stderr)
        assert host.store() == store, args
        assert host.kernel() == kernel, args
    assert len(json.loads(host.vtap_ok("-o", "json", "audit"))) == 2


def write_yaml(path, sessions):
    path.write_text(yaml.safe_dump({"sessions": sessions}))
    return str(path)


@on_both_datapaths
def test_apply_three_times_is_idempotent(host, tmp_path):
    doc = write_yaml(
        tmp_path / "taps.yaml",
        [{"name": "web", "to": "port:mon0", "flows": [
            {"name": "in80", "interface": "eth0", "direction": "in", "filter": "tcp port 80"},
            {"name": "both", "interface": "wire0", "direction": "both"},
        ]}],
    )
    for _ in range(3):
        host.vtap_ok("apply", "-f", doc)
    assert _bpf_count(host, "eth0", "ingress") == 1 and _bpf_count(host, "eth0", "egress") == 0
    assert _bpf_count(host, "wire0", "ingress") == 1 and _bpf_count(host, "wire0", "egress") == 1
    assert {row["state"] for row in json.loads(host.vtap_ok("-o", "json", "status"))} == {"active"}
    # --prune with an empty file removes everything vtap made.
    empty = write_yaml(tmp_path / "empty.yaml", [])
    host.vtap_ok("apply", "-f", empty, "--prune")
    assert _bpf_count(host, "eth0", "ingress") == 0 and _bpf_count(host, "wire0", "egress") == 0


def _bpf_count(host, dev, hook):
    """Installed classifiers (tc -j lists a chain header entry without options as well); on tcx, the programs on the hook."""
    if host.datapath == "tcx":
        from vtap_drivers.linux import bpfsys, tcxmirror

        with tcxmirror.in_netns(host.name):
            return len(bpfsys.query_tcx(socket.if_nametoindex(dev), hook).prog_ids)
    return sum(1 for f in host.filters(dev, hook) if f.get("kind") == "bpf" and "options" in f)


def kernel_progress(namespace, devices):
    """clsact qdiscs plus bpf classifiers on the ingress hooks of devices, read over netlink."""
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace) as ipr:
        index = {link.get("ifname"): link["index"] for link in ipr.get_links()}
        count = sum(1 for q in ipr.get_qdiscs() if q.get("kind") == "clsact")
        for device in devices:
            try:
                found = ipr.get_filters(index=index[device], parent=0xFFFFFFF2)
            except Exception:  # no clsact yet
                continue
            count += sum(1 for f in found if f.get("kind") == "bpf" and f.get("options") is not None)
        return count


def kill_part_way(command, count, total, started, timeout=60, slice=0.001):
    """Run command; once started() is true, let it run in slices of ~`slice` seconds between
    SIGSTOPs and SIGKILL it as soon as 0 < count() < total.

    A stopped process makes the kernel's state exact while it is counted, so
    the kill lands part way however fast the apply is.
    """
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and victim.poll() is None and not started():
            time.sleep(0.0005)
        while time.monotonic() < deadline and victim.poll() is None:
            os.kill(victim.pid, signal.SIGSTOP)
            found = count()
            if 0 < found < total:
                return found
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(slice)
        return count()
    finally:
        victim.kill()
        victim.wait()


@on_both_datapaths
def test_crash_mid_apply_then_apply_again_converges(host, tmp_path):
    for i in range(100):
        host.sh("ip", "link", "add", f"d{i}", "type", "ifb")  # this kernel has no dummy
        host.sh("ip", "link", "set", f"d{i}", "up")
    host.sh("ip", "addr", "add", "10.9.9.1/24", "dev", "mon0")  # a route to the remote: without one the flows are (rightly) degraded
    doc = write_yaml(
        tmp_path / "many.yaml",
        [{"name": "many", "to": "vxlan://10.9.9.9?vni=77", "flows": [
            {"name": f"f{i}", "interface": f"d{i}", "direction": "in", "filter": f"udp port {1000 + i}"} for i in range(100)
        ]}],
    )
    command = host.command("apply", "-f", doc)
    # The dataplane writes its catalog of marks just before it touches the kernel.
    if host.datapath == "tcx":  # outside `ip netns exec`: the catalog names the namespace; one pin per mirror
        catalog = os.path.join(os.path.dirname(host.state), f"tc-{host.name}.json")
        # Slices of 20 ms: the kernel's verifier gives up a program load when a signal arrives (EAGAIN; vtap
        # tries again, as libbpf, 5 times), and a SIGSTOP every millisecond would interrupt every try.
        progress = kill_part_way(command, lambda: len(host.pins()), 100, lambda: os.path.exists(catalog), slice=0.02)
        assert 0 < progress < 100, "the kill should land part way (pins)"
    else:
        catalog = os.path.join(os.path.dirname(host.state), "tc-host.json")
        progress = kill_part_way(command, lambda: kernel_progress(host.name, [f"d{i}" for i in range(100)]), 200, lambda: os.path.exists(catalog))
        assert 0 < progress < 200, "the kill should land part way (qdiscs and filters)"
    host.vtap_ok("apply", "-f", doc)
    assert [_bpf_count(host, f"d{i}", "ingress") for i in range(100)] == [1] * 100
    assert sum(_bpf_count(host, f"d{i}", "egress") for i in range(100)) == 0
    vxlans = [n for n, l in host.links().items() if l.get("linkinfo", {}).get("info_kind") == "vxlan"]
    assert len(vxlans) == 1
    status = json.loads(host.vtap_ok("-o", "json", "status"))
    assert len(status) == 100 and {row["state"] for row in status} == {"active"}
    host.vtap_ok("session", "delete", "many")
    assert sum(_bpf_count(host, f"d{i}", "ingress") for i in range(100)) == 0
    assert not [n for n, l in host.links().items() if l.get("linkinfo", {}).get("info_kind") == "vxlan"]
    assert "clsact" not in json.dumps(host.kernel()["qdiscs"])


def test_follow_repairs_a_filter_deleted_by_hand(host):
    host.vtap_ok("session", "create", "web", "--to", "port:mon0")
    host.vtap_ok("flow", "add", "web", "--interface", "eth0", "--direction", "in")
    assert _bpf_count(host, "eth0", "ingress") == 1
    follower = subprocess.Popen(
        ["ip", "netns", "exec", host.name, sys.executable, "-m", "vtap_cli.main", "--state", host.state, "follow", "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)
        host.sh("tc", "filter", "del", "dev", "eth0", "ingress")
        assert _bpf_count(host, "eth0", "ingress") == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _bpf_count(host, "eth0", "ingress") == 0:
            time.sleep(0.1)
        assert _bpf_count(host, "eth0", "ingress") == 1
    finally:
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=15)
    assert follower.returncode == 0, err
    assert "stopped" in err


def test_readme_sdk_example_runs_as_written(host, tmp_path):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "README.md")).read()
    script = readme.split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.py"
    path.write_text(script)
    env = {**os.environ, "VTAP_STATE": host.state}
    result = subprocess.run(["ip", "netns", "exec", host.name, sys.executable, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["web-in", "active"]
    assert _bpf_count(host, "eth0", "ingress") == 0
    audit = json.loads(host.vtap_ok("-o", "json", "audit"))
    assert [row["command"] for row in audit] == ["sdk: session create web", "sdk: flow add web", "sdk: session delete web"]


def tshark_frames(path):
    """Frames as an independent reader (tshark) sees them: hex of the captured bytes."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.cap_len", "-e", "frame.len"], capture_output=True, text=True, check=True).stdout
    return [tuple(int(x) for x in line.split()) for line in out.splitlines()]


def test_pcap_target_from_the_command_line(host, tmp_path):
    path = tmp_path / "web.pcapng"
    host.vtap_ok("session", "create", "rec", "--to", f"pcap:{path}", "--snaplen", "60")
    host.vtap_ok("flow", "add", "rec", "--interface", "eth0", "--direction", "in", "--filter", "tcp dst port 80")
    sent = [tcp_frame(A, B, "10.1.0.1", "10.1.0.2", 40000 + i, 80, payload=b"x" * 100) for i in range(6)]
    send(host.name, "wire0", sent + frames(3, 443))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not path.exists() or len(tshark_frames(path)) < 6):
        time.sleep(0.2)
    host.vtap_ok("session", "delete", "rec")
    assert tshark_frames(path) == [(60, len(sent[0]))] * 6
    from scapy.utils import rdpcap

    assert [bytes(p) for p in rdpcap(str(path))] == [f[:60] for f in sent]


def test_vtap_capture_terminates_a_vxlan_stream(host, tmp_path):
    # The collector is another host: a namespace of its own behind monpeer.
    collector = f"{host.name}-col"
    subprocess.run(["ip", "netns", "add", collector], check=True)
    capture = None
    try:
        host.sh("ip", "link", "set", "monpeer", "netns", collector)
        host.sh("ip", "addr", "add", "10.5.0.1/24", "dev", "mon0")
        for command in (["ip", "addr", "add", "10.5.0.2/24", "dev", "monpeer"], ["ip", "link", "set", "monpeer", "up"]):
            subprocess.run(["ip", "netns", "exec", collector, *command], check=True)
        path = tmp_path / "stream.pcapng"
        capture = subprocess.Popen(
            ["ip", "netns", "exec", collector, sys.executable, "-m", "vtap_cli.main", "capture", "--listen", "vxlan://10.5.0.2:4790", "-w", str(path), "--count", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(1.0)
        host.vtap_ok("session", "create", "tun", "--to", "vxlan://10.5.0.2:4790?vni=99")
        host.vtap_ok("flow", "add", "tun", "--interface", "eth0", "--direction", "in", "--filter", "udp")
        sent = frames(5, 53, udp_frame)
        send(host.name, "wire0", sent + frames(4, 80))
        _, err = capture.communicate(timeout=20)
        assert capture.returncode == 0, err
        assert "5 frames written" in err
        from scapy.utils import rdpcap

        assert [bytes(p) for p in rdpcap(str(path))] == sent
    finally:
        if capture is not None and capture.poll() is None:
            capture.kill()
            capture.wait()
        subprocess.run(["ip", "netns", "del", collector])


def test_a_second_session_on_the_same_vni_is_refused(host):
    host.vtap_ok("session", "create", "t1", "--to", "vxlan://10.9.9.9?vni=7")
    store, kernel = host.store(), host.kernel()
    result = host.vtap("session", "create", "t2", "--to", "vxlan://10.9.9.8?vni=7")
    assert result.returncode == 2 and "vni 7" in result.stderr
    assert host.store() == store and host.kernel() == kernel
