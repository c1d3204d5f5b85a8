"""Compiled filter programs kept in the state dir: equal to a fresh compile, private, never trusted when damaged."""

import json
import os
import stat

import pytest

from vtap_core import filter_cache, filters
from vtap_core.filter_cache import FILE_NAME, FilterCache
from vtap_core.filters import compile_filter

LIVE = os.geteuid() == 0  # a live handle (VLAN metadata handling) needs root
EXPRESSIONS = ["tcp port 80", "vlan 100 and udp", "(icmp) and not (udp dst port 4789 and dst host 10.0.0.9)", ""]


def fresh_compile(expression, live):
    """libpcap itself, past every cache."""
    program, _ = filters._compile.__wrapped__(expression, live)
    return program


def entries(state_dir):
    with open(os.path.join(state_dir, FILE_NAME)) as f:
        return json.load(f)


@pytest.mark.parametrize("live", [False] + ([True] if LIVE else []))
def test_a_cached_program_equals_a_fresh_compile_in_the_next_process(tmp_path, live):
    first = FilterCache(str(tmp_path))
    for expression in EXPRESSIONS:
        compile_filter(expression, live=live, cache=first)
    first.save()
    filters._compile.cache_clear()
    second = FilterCache(str(tmp_path))  # as another process: only the file
    for expression in EXPRESSIONS:
        cached = second.get(expression, live)
        assert cached is not None and cached == fresh_compile(expression, live)
    assert filters._compile.cache_info().misses == 0  # nothing was compiled to answer


@pytest.mark.skipif(not LIVE, reason="needs root: libpcap's live handle")
def test_live_and_dead_programs_are_kept_apart():
    cache = FilterCache("/nonexistent-never-saved")
    dead = compile_filter("vlan 100", live=False, cache=cache)
    live = compile_filter("vlan 100", live=True, cache=cache)
    assert dead != live
    assert cache.get("vlan 100", False) == dead and cache.get("vlan 100", True) == live


def test_the_file_is_private(tmp_path):
    cache = FilterCache(str(tmp_path))
    compile_filter("udp", live=False, cache=cache)
    cache.save()
    mode = os.stat(tmp_path / FILE_NAME).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temporary left behind


@pytest.mark.parametrize("damage", ["program", "digest", "truncate", "not-a-return"])
def test_a_damaged_entry_is_compiled_again_not_trusted(tmp_path, damage):
    cache = FilterCache(str(tmp_path))
    right = compile_filter("tcp port 80", live=False, cache=cache)
    cache.save()
    path = tmp_path / FILE_NAME
    data = entries(str(tmp_path))
    (name,) = data
    entry = data[name]
    if damage == "program":
        entry["program"] = entry["program"][:-1] + ("1" if entry["program"][-1] == "0" else "0")  # one changed bit, digest kept
    elif damage == "digest":
        entry["digest"] = "0" * 64
    elif damage == "not-a-return":
        entry["program"] = entry["program"][:-16] + "1500000000000000"  # last instruction a jump, digest made to fit
        entry["digest"] = filter_cache._digest(entry["key"], entry["program"])
    text = json.dumps(data)
    path.write_text(text[: len(text) // 2] if damage == "truncate" else text)
    filters._compile.cache_clear()
    again = FilterCache(str(tmp_path))
    assert again.get("tcp port 80", False) is None
    assert compile_filter("tcp port 80", live=False, cache=again) == right
    assert filters._compile.cache_info().misses == 1  # really compiled
    again.save()
    assert FilterCache(str(tmp_path)).get("tcp port 80", False) == right  # repaired on save


def test_a_symlink_is_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    planted = FilterCache(str(tmp_path / "planted"))
    os.makedirs(tmp_path / "planted")
    compile_filter("udp", live=False, cache=planted)
    planted.save()
    os.rename(tmp_path / "planted" / FILE_NAME, elsewhere)
    os.symlink(elsewhere, tmp_path / FILE_NAME)
    before = elsewhere.read_text()
    cache = FilterCache(str(tmp_path))
    assert cache.get("udp", False) is None  # not read through the link
    compile_filter("tcp", live=False, cache=cache)
    cache.save()
    assert elsewhere.read_text() == before  # not written through it either
    assert not os.path.islink(tmp_path / FILE_NAME)


def test_a_file_others_may_write_is_not_trusted(tmp_path):
    cache = FilterCache(str(tmp_path))
    compile_filter("udp", live=False, cache=cache)
    cache.save()
    os.chmod(tmp_path / FILE_NAME, 0o666)
    assert FilterCache(str(tmp_path)).get("udp", False) is None


def test_an_invalid_expression_is_refused_and_not_cached(tmp_path):
    cache = FilterCache(str(tmp_path))
    with pytest.raises(filters.ValidationError):
        compile_filter("tcp port 99999", live=False, cache=cache)
    cache.save()
    assert not (tmp_path / FILE_NAME).exists()


def test_a_cached_program_still_gets_the_kernel_checks(tmp_path):
    """inbound/outbound are refused even when a program for them sits in the cache."""
    cache = FilterCache(str(tmp_path))
    cache.put("inbound", False, fresh_compile("inbound", False))
    with pytest.raises(filters.ValidationError, match="use the flow's direction"):
        compile_filter("inbound", live=False, cache=cache)


def packet_sockets_open_here() -> int:
    """This process's AF_PACKET sockets (libpcap's live handles), from /proc."""
    inodes = set()
    for name in ("/proc/net/packet",):
        with open(name) as f:
            next(f)
            inodes.update(line.split()[-1] for line in f if line.strip())
    mine = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            mine += 1
    return mine


@pytest.mark.skipif(not LIVE, reason="needs root: libpcap's live handle")
def test_one_live_handle_serves_a_run_of_compiles_and_is_closed_when_idle():
    import time

    time.sleep(filters.HANDLE_IDLE + 1.0)  # a handle an earlier test used is closed by now
    before = packet_sockets_open_here()
    filters._compile.cache_clear()
    for port in range(40000, 40050):  # fifty distinct expressions
        compile_filter(f"vlan 100 and tcp port {port}", live=True)
        assert packet_sockets_open_here() <= before + 1
    assert packet_sockets_open_here() == before + 1
    time.sleep(filters.HANDLE_IDLE + 1.0)
    assert packet_sockets_open_here() == before  # closed once idle: no socket left on lo
