"""The `apply -f` loader: what yaml.safe_load would accept silently (or crash on) is refused in one line."""

import subprocess
import sys

import pytest
import yaml

from vtap_core.errors import ValidationError
from vtap_core.yamlfile import load_file

GOOD = "sessions:\n  - name: web\n    to: vxlan://192.0.2.10?vni=42\n    flows:\n      - {name: web-in, interface: eth0, filter: tcp port 80}\n"


def test_a_good_file_loads_as_safe_load_reads_it(tmp_path):
    path = tmp_path / "taps.yaml"
    path.write_text(GOOD)
    assert load_file(str(path)) == yaml.safe_load(GOOD)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"a: &x [1, 2]\nb: *x\n", "line 2: aliases (*x) are not allowed"),
        (b"x: " + b"[" * 30 + b"]" * 30 + b"\n", "nested deeper than 20 levels"),
        (b"- " * 30 + b"1\n", "nested deeper than 20 levels"),
        (b"sessions:\n  - name: a\n    to: port:x\n    name: b\n", "line 4: key 'name' appears twice"),
        (b"sessions: []\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 18)"),
        (b"sessions: [\n", "not valid YAML"),
    ],
)
def test_hostile_files_are_refused_on_the_file_field(tmp_path, content, words):
    path = tmp_path / "taps.yaml"
    path.write_bytes(content)
    with pytest.raises(ValidationError) as refused:
        load_file(str(path))
    assert refused.value.field == "file" and words in str(refused.value) and "\n" not in str(refused.value)


def test_nesting_that_crashes_libyaml_is_refused_in_a_process_that_survives(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_bytes(b"[" * 200000 + b"]" * 200000)
    code = f"from vtap_core.yamlfile import load_file\ntry:\n    load_file({str(path)!r})\nexcept Exception as exc:\n    print(exc)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "nested deeper" in result.stdout, result
