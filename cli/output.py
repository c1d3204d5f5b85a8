"""Listings as a table, JSON or YAML (`-o table|json|yaml` on every listing)."""

from __future__ import annotations

import json
import sys

FORMATS = ("table", "json", "yaml")


def emit(rows: list[dict], columns: list[str], fmt: str = "table", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "json":
        stream.write(json.dumps(rows, indent=2, sort_keys=False, default=str) + "\n")
    elif fmt == "yaml":
        import yaml

        stream.write(yaml.safe_dump(rows, sort_keys=False, default_flow_style=False) if rows else "[]\n")
    else:
        stream.write(table(rows, columns))


def table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)\n"
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths)).rstrip()]
    lines += ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items() if v is not None)
    return str(value)
