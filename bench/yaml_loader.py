"""What the checks of `apply -f` files cost: vtap_core.yamlfile against plain PyYAML loaders.

One generated tap file (--sessions sessions of --flows flows each) is loaded
--repeats times by: PyYAML's pure-Python safe_load, libyaml's CSafeLoader
unchecked, and vtap_core.yamlfile.load_text (libyaml plus the refusal of
aliases, deep nesting and duplicate keys). Best and median seconds of each,
and yamlfile's cost relative to the unchecked C loader. Reports only.

    python3 bench/yaml_loader.py [--sessions 500] [--flows 10] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from vtap_core import yamlfile  # noqa: E402


def tap_file(sessions: int, flows: int) -> str:
    lines = ["sessions:"]
    for i in range(sessions):
        lines += [f"  - name: s{i}", f"    to: vxlan://192.0.2.10?vni={i}", "    flows:"]
        for j in range(flows):
            lines += [f"      - name: f{i}-{j}", f"        interface: eth{j}", "        direction: in", f"        filter: tcp port {1000 + j}"]
    return "\n".join(lines) + "\n"


def timings(load, text: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load(text)
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--flows", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    text = tap_file(args.sessions, args.flows)
    loaders = {
        "pyyaml_safe_load": yaml.safe_load,
        "libyaml_csafeloader": lambda t: yaml.load(t, Loader=yaml.CSafeLoader),
        "vtap_yamlfile": yamlfile.load_text,
    }
    assert yamlfile.load_text(text) == yaml.load(text, Loader=yaml.CSafeLoader)
    results = {}
    for name, load in loaders.items():
        times = timings(load, text, args.repeats)
        results[name] = {"best_s": min(times), "median_s": benchlib.median(times), "runs_s": times}
    ratio = results["vtap_yamlfile"]["median_s"] / results["libyaml_csafeloader"]["median_s"]
    summary = [f"{len(text)} bytes, {args.sessions} sessions x {args.flows} flows, {args.repeats} runs each"]
    summary += [f"{name:22} best {r['best_s']:.3f} s  median {r['median_s']:.3f} s" for name, r in results.items()]
    summary.append(f"yamlfile / unchecked CSafeLoader (medians): {ratio:.2f}")
    text_out = "\n".join(summary)
    print(text_out)
    data = {"environment": benchlib.environment(), "sessions": args.sessions, "flows": args.flows, "bytes": len(text), "loaders": results, "yamlfile_over_csafeloader": ratio}
    benchlib.save("yaml_loader", data, text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
