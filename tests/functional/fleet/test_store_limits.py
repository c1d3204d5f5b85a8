"""One change is one etcd transaction: a file of more flows than etcd's --max-txn-ops (128 by default)
is refused whole, in one line, with nothing written; with the limit raised it lands whole."""

import json


def big_file(path, flows: int) -> str:
    lines = ["sessions:", "- name: web", "  to: vxlan://192.0.2.1?vni=5", "  flows:"]
    lines += [f"  - {{name: f{i}, interface: eth{i}, host: host-{i % 7}, direction: in}}" for i in range(flows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_change_larger_than_one_etcd_transaction_is_refused_whole_then_fits_when_etcd_allows(etcd, vtap, netns, tmp_path):
    env = {"VTAP_STORE": etcd.url("vtap/prod"), "VTAP_LINUX_NETNS": netns, "VTAP_HOST": "admin"}
    state = str(tmp_path / "state.db")
    assert vtap("session", "create", "db", "--to", "vxlan://192.0.2.2?vni=6", state=state, env=env).returncode == 0
    before = etcd.keys("vtap/prod")
    document = big_file(tmp_path / "big.yaml", 200)
    refused = vtap("apply", "-f", document, state=state, env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--max-txn-ops" in refused.stderr and "nothing was changed" in refused.stderr
    assert etcd.keys("vtap/prod") == before  # not one flow, not the session, no audit row
    etcd.kill()
    etcd.extra = ["--max-txn-ops", "1000"]
    etcd.start()
    applied = vtap("apply", "-f", document, state=state, env=env)
    assert applied.returncode == 0, applied.stderr
    flows = {k: json.loads(v) for k, v in etcd.keys("vtap/prod").items() if "/flows/" in k}
    assert len(flows) == 200 and flows["/vtap/prod/desired/linux/flows/f9"]["host"] == "host-2"
    # The same file again changes no flow: only the generation and the audit row are written.
    revision = etcd.status()["header"]["revision"]
    assert vtap("apply", "-f", document, state=state, env=env).returncode == 0
    assert int(etcd.status()["header"]["revision"]) == int(revision) + 1
