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
