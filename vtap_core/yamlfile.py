"""Reading an `apply -f` file: libyaml's fast loader, with what a hostile or careless file can do refused.

* Not UTF-8: refused, naming the first bad byte.
* Aliases (`*name`): refused. A few lines of anchors and aliases expand to
  billions of nodes ("billion laughs"); a tap file never needs them.
* Nesting deeper than MAX_DEPTH: refused before libyaml's composer recurses
  (deep enough nesting crashes it).
* The same key twice in one mapping: refused (YAML says keys are unique;
  PyYAML would silently keep the last one).

Each refusal is one ValidationError on the field `file`, with the line.
The checks walk libyaml's event stream once (C speed) before loading.
"""

from __future__ import annotations

import yaml

from vtap_core.errors import ValidationError

MAX_DEPTH = 20  # a tap file needs 5 (document, sessions, session, flows, flow)
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        self.key, self.line = key, line


class _UniqueKeyLoader(_BASE_LOADER):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            # Compared as written (tag and text): constructing every key twice would double the load time.
            key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:
                raise _DuplicateKey(key_node.value, key_node.start_mark.line + 1)
            if key is not None:
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_file(path: str):
    """The document in the YAML file at `path` (None when empty); ValidationError('file', ...) otherwise."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ValidationError("file", f"{path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("file", f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return load_text(text, path)


def load_text(text: str, name: str = "document"):
    try:
        _check_events(text, name)
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ValidationError("file", f"{name} line {dup.line}: key {dup.key!r} appears twice in one mapping") from None
    except yaml.YAMLError as exc:
        raise ValidationError("file", f"{name}: not valid YAML ({' '.join(str(exc).split())})") from None


def _check_events(text: str, name: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_BASE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise ValidationError("file", f"{name} line {event.start_mark.line + 1}: aliases (*{event.anchor}) are not allowed; write the value out")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValidationError("file", f"{name} line {event.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
