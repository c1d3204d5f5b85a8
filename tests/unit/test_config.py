"""Flags win over the environment, the environment over the config file."""

import pytest

from vtap_core.config import Config
from vtap_core.errors import ValidationError


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_precedence(tmp_path):
    path = write(tmp_path, 'driver = "lab"\nstate = "/tmp/from-file.db"\n[lab]\nprefix = "file"\n')
    config = Config({}, path, environ={})
    assert config.driver == "lab" and config.state == "/tmp/from-file.db"
    assert config.driver_settings() == {"prefix": "file"}
    config = Config({}, path, environ={"VTAP_LAB_PREFIX": "env", "VTAP_DRIVER": "linux"})
    assert config.driver == "linux"
    assert config.driver_settings("lab") == {"prefix": "env"}
    config = Config({"prefix": "flag"}, path, environ={"VTAP_LAB_PREFIX": "env"})
    assert config.driver_settings("lab") == {"prefix": "flag"}


def test_bad_config_and_driver(tmp_path):
    with pytest.raises(ValidationError, match="no such file"):
        Config({}, str(tmp_path / "missing.toml"), environ={})
    with pytest.raises(ValidationError, match="config"):
        Config({}, write(tmp_path, "driver = = 1"), environ={})
    with pytest.raises(ValidationError, match="'nope' is not a driver"):
        Config({"driver": "nope"}, None, environ={"VTAP_CONFIG": write(tmp_path, "")}).driver
