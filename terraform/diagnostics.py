"""Client errors as Terraform diagnostics that say what to fix: the one translation point.

Resources call :func:`api_error` in their ``except APIError`` and return; the diagnostic's
summary says what failed (``Cannot create intention web => db``) and its detail whose fault it
is and what to do:

* no answer (``ConnectionFailed``): the provider's ``address`` (or ``TRELLIS_HTTP_ADDR``) and
  TLS settings, or the server is down;
* 403: the permission the provider's token lacks, as the server names it, and a rule that
  grants it (each resource knows which rule: ``hint``);
* 409: what conflicts (the resource says it: ``conflict``), with the server's words;
* 400 (and 413, a value too large): the server's message, attached to the attribute that
  caused it when the message names an API field the resource maps (``fields``:
  ``{"Action": "action"}``), so Terraform points at that line of the configuration;
* anything else (404 where none is expected, 5xx): the server's words, and that the fault is
  the server's when the status is 5xx.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tf.utils import Diagnostics

from trellis.proxy.client import APIError, ConnectionFailed

_PERMISSION = re.compile(r"lacks permission '(.+)'\s*$")


def api_error(
    diags: Diagnostics,
    err: APIError,
    doing: str,
    *,
    attribute: str | None = None,
    fields: Mapping[str, str] | None = None,
    hint: str = "",
    conflict: str = "",
) -> None:
    """Add one error diagnostic for ``err``, which happened while ``doing`` (``create
    intention web => db``). ``attribute`` is where a 400 points when its message names no field
    of ``fields``."""
    summary = f"Cannot {doing}"
    if isinstance(err, ConnectionFailed):
        diags.add_error(
            summary,
            f"{err.message}. Check the provider's address (or TRELLIS_HTTP_ADDR), its TLS "
            "settings (ca_file, TRELLIS_CACERT), and that the Trellis server is running.",
        )
        return
    status = err.status
    if status == 403:
        m = _PERMISSION.search(err.message)
        lacking = m.group(1) if m else "the permission this needs"
        detail = (
            f"The Trellis token the provider uses (its token setting, or TRELLIS_HTTP_TOKEN) "
            f"lacks {lacking}. Give the token a policy that grants it"
            + (f", for example:\n\n    {hint}\n" if hint else ".")
            + f"\nServer: {err.message}"
        )
        diags.add_error(f"{summary}: permission denied", detail)
        return
    if status == 409:
        detail = f"{conflict}\n\nServer: {err.message}" if conflict else err.message
        diags.add_error(f"{summary}: conflict", detail)
        return
    if status in (400, 413):  # 413: a value over the server's size limit
        path = _attribute_of(err.message, fields or {}) or attribute
        diags.add_error(
            f"{summary}: the server refused the value",
            err.message,
            path=[path] if path else None,
        )
        return
    if status is not None and status >= 500:
        diags.add_error(
            f"{summary}: the Trellis server failed (HTTP {status})",
            f"{err.message}\n\nThis is the server's fault, not the configuration's; its log "
            "says more. Running the command again may succeed.",
        )
        return
    diags.add_error(f"{summary} (HTTP {status})", err.message)


def _attribute_of(message: str, fields: Mapping[str, str]) -> str | None:
    """The attribute whose API field the server's message names first (``Action: must be
    allow or deny`` -> ``action``)."""
    best: tuple[int, str] | None = None
    for api_name, attribute in fields.items():
        m = re.search(rf"(?<![A-Za-z]){re.escape(api_name)}(?![A-Za-z])", message)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), attribute)
    return best[1] if best else None
