"""Which drivers exist and how to load one (stevedore entry points `vtap.drivers`).

Listing reads entry-point metadata only; a driver's module (and so pyvmomi,
proxmoxer or libvirt) is imported only when that driver is loaded.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from vtap_core.errors import DriverLoadError, ValidationError

GROUP = "vtap.drivers"


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def driver_names() -> list[str]:
    return sorted(_entry_points())


def check_driver_name(name: str) -> str:
    if name not in _entry_points():
        raise ValidationError("driver", f"{name!r} is not a driver; installed: {', '.join(driver_names())}")
    return name


def settings_spec(name: str) -> dict:
    """{setting: ENV_VAR} the driver takes, read from its (import-cheap) package."""
    module = _entry_points()[check_driver_name(name)].module
    package = module.rsplit(".", 1)[0] if "." in module else module
    return dict(getattr(importlib.import_module(package), "SETTINGS", {}))


def load_driver(name: str, **settings):
    """An instance of driver `name`; a driver that fails to import is a loud, clear error."""
    from stevedore import driver as stevedore_driver

    check_driver_name(name)

    def fail(_manager, entrypoint, exc):
        if isinstance(exc, ValidationError):
            raise exc  # a bad setting (e.g. datapath): the user's input, exit 2, not a broken driver
        missing = getattr(exc, "name", None)
        why = f"missing Python module {missing!r}" if isinstance(exc, ImportError) and missing else f"{type(exc).__name__}: {exc}"
        raise DriverLoadError(entrypoint.name, why) from exc

    manager = stevedore_driver.DriverManager(
        namespace=GROUP,
        name=name,
        invoke_on_load=True,
        invoke_kwds=settings,
        on_load_failure_callback=fail,
    )
    return manager.driver
