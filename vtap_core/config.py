"""Global options from flags, the environment and a config file, in that order of precedence.

The config file is TOML: top-level `driver` and `state`, and a section per
driver with its connection settings, e.g.

    driver = "kvm"
    [kvm]
    uri = "qemu:///system"
    [vsphere]
    url = "https://vcenter.example/sdk"
    user = "tap@vsphere.local"
    password = "..."        # secrets belong here or in the environment, never on argv
    [store]                 # a fleet's shared store (default: the SQLite file `state`)
    url = "etcds://10.0.0.1:2379,10.0.0.2:2379/vtap/prod"
    ca = "/etc/vtap/etcd-ca.pem"   # also cert, key, user, password, insecure (env VTAP_STORE_CA, ...)

Found at --config PATH, else $VTAP_CONFIG, else /etc/vtap/config.toml (root)
or ~/.config/vtap/config.toml.
"""

from __future__ import annotations

import os
import tomllib

from vtap_core import registry
from vtap_core.errors import ValidationError

DEFAULT_DRIVER = "linux"
STORE_SETTINGS = ("ca", "cert", "key", "insecure", "user", "password")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def default_config_path() -> str:
    if os.geteuid() == 0:
        return "/etc/vtap/config.toml"
    return os.path.join(os.path.expanduser("~"), ".config", "vtap", "config.toml")


def load_file(path: str | None, environ=os.environ) -> dict:
    explicit = path or environ.get("VTAP_CONFIG")
    path = explicit or default_config_path()
    if not os.path.exists(path):
        if explicit:
            raise ValidationError("config", f"{path}: no such file")
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ValidationError("config", f"{path}: {exc}") from None


def as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValidationError(name, f"{value!r} is not true or false")


class Config:
    """Resolved global options for one invocation."""

    def __init__(self, flags: dict | None = None, config_path: str | None = None, environ=None):
        self.flags = {k: v for k, v in (flags or {}).items() if v is not None}
        self.environ = os.environ if environ is None else environ
        self.file = load_file(config_path, self.environ)

    @property
    def driver(self) -> str:
        name = self.flags.get("driver") or self.environ.get("VTAP_DRIVER") or self.file.get("driver") or DEFAULT_DRIVER
        return registry.check_driver_name(name)

    @property
    def state(self) -> str | None:
        return self.flags.get("state") or self.environ.get("VTAP_STATE") or self.file.get("state")

    @property
    def store(self) -> str | None:
        """The store URL: --store > VTAP_STORE > [store] url; None is the SQLite file at `state`."""
        section = self._store_section()
        return self.flags.get("store") or self.environ.get("VTAP_STORE") or section.get("url")

    def store_settings(self) -> dict:
        """TLS files and credentials of the store: environment > [store] section (never argv)."""
        section = self._store_section()
        settings = {}
        for name in STORE_SETTINGS:
            env_var = f"VTAP_STORE_{name.upper()}"
            value = self.environ.get(env_var, section.get(name))
            if value not in (None, ""):
                settings[name] = as_bool(env_var, value) if name == "insecure" else value
        return settings

    def _store_section(self) -> dict:
        section = self.file.get("store", {})
        if not isinstance(section, dict):
            raise ValidationError("config", "[store] must be a table")
        return section

    def driver_settings(self, driver: str | None = None) -> dict:
        """The driver's connection settings: flag > environment > config file section."""
        driver = driver or self.driver
        section = self.file.get(driver, {})
        if not isinstance(section, dict):
            raise ValidationError("config", f"[{driver}] must be a table")
        settings = {}
        for name, env_var in registry.settings_spec(driver).items():
            if name in self.flags:
                value = self.flags[name]
            elif env_var and env_var in self.environ:
                value = self.environ[env_var]
            elif name in section:
                value = section[name]
            else:
                continue
            settings[name] = as_bool(env_var or name, value) if name == "insecure" else value
        return settings
