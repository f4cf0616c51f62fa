"""The service-name rule: one rule for every place a service is named. Pure.

The catalog registers services (and nodes) under it, intentions name services by it, DNS
looks services up by it, and the CA signs certificates only for names that pass it, so a
name one part refuses can never be used through another (a certificate for ``-`` or ``web.``
that no catalog entry or intention could ever name).

A name is 1-128 ASCII letters, digits, ``-``, ``_`` or ``.``, starting and ending with a letter
or digit: DNS-safe, because DNS is one of the ways services are found.
"""

from __future__ import annotations

import re

MAX_LENGTH = 128
#: The rule in words, for error messages.
RULE = (
    f"use 1-{MAX_LENGTH} letters, digits, '-', '_' or '.',"
    " starting and ending with a letter or digit"
)
# Used with fullmatch only: with match(), "$" also matches before a trailing newline, and
# "web\n" would pass.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?")  # 1-MAX_LENGTH


def is_service_name(name: object) -> bool:
    """Whether ``name`` is a valid service (or node) name."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


#: The longest service or check ID (Consul sets none; Trellis keeps IDs bounded so that no
#: registration can make every read that lists it arbitrarily large).
MAX_ID_LENGTH = 256
#: The ID rule in words, for error messages.
ID_RULE = (
    f"an ID is 1-{MAX_ID_LENGTH} printable characters ('/' and other punctuation included,"
    " no control characters or other unprintable ones)"
)


def is_instance_id(value: object) -> bool:
    """Whether ``value`` is a valid service or check ID.

    Consul refuses no character in an ID at registration, but its HTTP server answers 400 to
    any request whose path holds an unprintable character, so such an ID could be registered
    and then never deregistered or updated through ``/v1/agent/service/deregister/{id}`` and
    the check endpoints (hashicorp/consul#20122). Trellis accepts exactly the IDs those paths
    can name: printable characters (``str.isprintable`` is the same set as Go's
    ``unicode.IsPrint``, which Consul's check uses), ``/`` included, as in Patroni's
    ``scope/name``.
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable()
