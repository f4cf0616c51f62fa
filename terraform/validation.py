"""Checks Terraform runs at plan time (``ValidateResourceConfig``), before any API call.

Pure functions over config values. Each returns None when the value is acceptable and the
problem otherwise, in words meant for the author of the configuration (who is at fault). A
value Terraform does not know yet (``Unknown``, computed from another resource) or that is not
set (None) is not checked here: the API checks it when it arrives.

The rules are the server's own, taken from the shared pure code where it exists (service names:
:func:`trellis.proxy.authz.check_name`) and restated where the server's check lives in a Flask
view (key paths), so that a plan refuses what an apply would have been refused.
"""

from __future__ import annotations

import re
from typing import Any

from tf.types import Unknown

from trellis.proxy import authz, names
from trellis.proxy.durations import parse_duration

#: The server's limit on a key's length (api/views/kv.py MAX_KEY_BYTES).
MAX_KEY_BYTES = 1024
#: The server's limit on an intention's description and meta (api/schemas/intentions.py).
MAX_DESCRIPTION = 512
MAX_META_KEYS = 64


def known(value: Any) -> bool:
    """Set and known at plan time."""
    return value is not None and value is not Unknown


def service_name(value: Any) -> str | None:
    """A service name or ``*`` alone (the intention rule)."""
    if not known(value):
        return None
    try:
        authz.check_name(value)
    except authz.IntentionError as e:
        return str(e)
    return None


def catalog_name(value: Any) -> str | None:
    """A service, node or service ID name as the catalog takes it (DNS-safe; no ``*``)."""
    if not known(value):
        return None
    if not names.is_service_name(value):
        return f"{value!r} is not a valid name: {names.RULE}"
    return None


def port(value: Any) -> str | None:
    if not known(value):
        return None
    if value != int(value) or not 0 <= value <= 65535:
        return f"a port is a whole number from 0 to 65535, not {value}"
    return None


def duration(value: Any) -> str | None:
    """A Go duration (``10s``, ``1m30s``), as the server parses it."""
    if not known(value) or value == "":
        return None
    try:
        parse_duration(value)
    except ValueError as e:
        return f"{value!r} is not a duration ({e}); write e.g. 10s or 1m30s"
    return None


def intention_action(value: Any) -> str | None:
    if not known(value):
        return None
    if value not in (authz.ALLOW, authz.DENY):
        return f"action must be {authz.ALLOW!r} or {authz.DENY!r}, not {value!r}"
    return None


def description(value: Any) -> str | None:
    if known(value) and len(value) > MAX_DESCRIPTION:
        return f"description is {len(value)} characters long; at most {MAX_DESCRIPTION} are kept"
    return None


def intention_meta(value: Any) -> str | None:
    if not known(value):
        return None
    if len(value) > MAX_META_KEYS:
        return f"meta has {len(value)} keys; at most {MAX_META_KEYS} are allowed"
    for k, v in value.items():
        if not k or len(k) > 128:
            return f"meta key {k!r} must be 1-128 characters long"
        if known(v) and len(v) > 512:
            return f"meta value of {k!r} is longer than 512 characters"
    return None


def key_path(value: Any) -> str | None:
    """A K/V key as the server stores it. A leading ``/`` is refused rather than stripped:
    the server would store ``a/b`` for ``/a/b``, and the next plan would show a difference
    between the configuration and the key read back, forever."""
    if not known(value):
        return None
    if value == "":
        return "the key path must not be empty"
    if value.startswith("/"):
        return f"key path {value!r} must not start with '/' (write {value.lstrip('/')!r})"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"key path is longer than {MAX_KEY_BYTES} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "key path contains control characters"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "key path is not valid UTF-8"
    if any(seg in (".", "..") for seg in value.split("/")):
        return f"key path {value!r} must not contain '.' or '..' segments"
    return None


def flags(value: Any) -> str | None:
    """K/V flags: an unsigned 64-bit integer, as Consul's API takes it."""
    if not known(value):
        return None
    if value != int(value) or not 0 <= value < 2**64:
        return f"flags must be a whole number from 0 to 2^64-1, not {value}"
    return None


def key_prefix(value: Any) -> str | None:
    """The prefix of ``trellis_keys``: a key path ending in ``/``. Without the ``/``,
    ``config/web`` would also cover ``config/website/...``, keys of another owner."""
    if not known(value):
        return None
    problem = key_path(value)
    if problem:
        return problem.replace("key path", "path_prefix", 1)
    if not value.endswith("/"):
        return f"path_prefix {value!r} must end with '/' (write {value + '/'!r})"
    return None


def relative_key(value: str) -> str | None:
    """A key's path under a ``trellis_keys`` prefix (the full path is checked as well)."""
    if value == "":
        return 'a key under the prefix must have a name ("" is the prefix itself)'
    if value.startswith("/"):
        return f"key {value!r} must not start with '/' (the prefix ends with one)"
    return None


def policy_name(value: Any) -> str | None:
    """An ACL policy's name, as the server checks it (api/schemas/acl.py)."""
    if not known(value):
        return None
    if not _POLICY_NAME.match(value):
        return f"policy name {value!r} must be 1-128 letters, digits, '-' or '_'"
    return None


_POLICY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
