"""Credentials never travel inside URLs: refused on the way in, scrubbed on every way out.

A password in `https://user:password@host` would end up in the append-only
audit log (which stores the command line), in error messages and in logs.
Connection URLs are refused when they carry one (check_url_settings); every
message, audit row and log line still goes through redact(), in case a URL
with credentials arrives from somewhere else (a platform's own error text).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

from vtap_core.errors import ValidationError

# scheme://userinfo@ -> scheme://***@   (userinfo: anything up to '@' that is not a path, space or quote)
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"?#]+@")
# ?password=... &token=... -> ***
SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|token|secret|ticket|api_?key)[A-Za-z_]*=)[^&;\s'\"#]*", re.IGNORECASE)
# Connection settings that hold a URL; libvirt URIs may name a user (ssh), never a password.
URL_SETTINGS = ("url", "uri")


def redact(text) -> str:
    """`text` with the credentials of any URL in it replaced by ***."""
    text = USERINFO.sub(r"\g<scheme>***@", str(text))
    return SECRET_QUERY.sub(r"\g<key>***", text)


def check_url(field: str, url, allow_user: bool = False) -> None:
    """ValidationError (naming the field, never echoing the secret) when the URL carries credentials."""
    if not isinstance(url, str):
        return
    try:
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:
        return  # not a URL at all: the driver says what it expects
    if password is not None or (username is not None and not allow_user) or SECRET_QUERY.search(url):
        where = "no password" if allow_user else "no user or password"
        raise ValidationError(field, f"{redact(url)}: {where} in the URL; give the user with --user and the password in the environment or the config file")


def check_url_settings(settings: dict) -> None:
    """Refuse every connection URL setting that carries credentials."""
    for name in URL_SETTINGS:
        if name in settings:
            check_url(name, settings[name], allow_user=name == "uri")


class RedactingFilter(logging.Filter):
    """Scrubs credentials out of log records (messages and their arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True
