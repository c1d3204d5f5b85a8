"""Building initramfs images for the tests' direct-boot guests (the kvm tests' tiny guest, the stock-kernel lane)."""

from __future__ import annotations

import os
from pathlib import Path


def cpio_newc(entries) -> bytes:
    """A newc cpio archive of (path, mode, data) entries (what the kernel unpacks as initramfs)."""
    out = bytearray()
    for ino, (path, mode, data) in enumerate(list(entries) + [("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += b"\0" * (-(110 + len(name)) % 4)
        out += data
        out += b"\0" * (-len(data) % 4)
    return bytes(out)


def load_order(release: str, wanted) -> list[str]:
    """Module paths (relative to /lib/modules/RELEASE) to insmod, dependencies first."""
    deps = {}
    for line in Path(f"/lib/modules/{release}/modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    order: list[str] = []

    def add(module):
        for dep in deps[module]:
            add(dep)
        if module not in order:
            order.append(module)

    for name in wanted:
        add(next(m for m in deps if os.path.basename(m) in (f"{name}.ko", f"{name}.ko.xz")))
    return order
