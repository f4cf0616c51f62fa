"""Requests that web pages make: refused when a page could use them against the API.

Theory of operation
-------------------
Any web page a user opens can make their browser send requests to ``127.0.0.1:8500``. The
browser stops the page from *reading* a cross-origin answer (Trellis sends no CORS headers),
but not from *sending* a "simple" request: a GET, or a POST whose ``Content-Type`` is
``text/plain``, ``application/x-www-form-urlencoded`` or ``multipart/form-data``. Trellis parses
a JSON body whatever its ``Content-Type`` (as Consul does: ``curl -d @body.json`` sends
``application/x-www-form-urlencoded``), so with ACLs off such a page could create an intention
or write a key. Any other request (PUT, DELETE, a JSON content type) is "preflighted": the
browser asks first with OPTIONS, Trellis does not answer with CORS approval, and the request
is never sent.

So a state-changing request (POST, PUT, PATCH, DELETE) is refused with a 403 when a browser
says it comes from another origin, and its ``Content-Type`` is not ``application/json``. A
browser says so with ``Sec-Fetch-Site: cross-site`` or ``same-site`` (a page on another port
of the same host is another origin too), or, when it sends no ``Sec-Fetch-Site``, with an
``Origin`` that is not the request's own (``null`` included: sandboxed frames and files).
curl, the CLI and Consul's clients send neither header, so nothing changes for them.

DNS rebinding defeats the origin check: the page's own host name is made to resolve to
127.0.0.1, its requests are then same-origin, and the browser lets it read the answers too.
What gives it away is the ``Host`` header, which carries the page's name. ``trellis dev`` (a
server on a workstation, ACLs off) therefore answers only requests whose ``Host`` is an IP
address, ``localhost`` (or a name under ``.localhost``, which browsers resolve themselves), or
the address it was told to listen on: names no rebinding attacker controls. ``trellis server``
does not check ``Host``: it is reached through names and load balancers an operator chooses,
and runs with ACLs for anything exposed.

``refusal`` is the whole decision, pure; ``install`` applies it to every request of an app.
``trellis dev``'s node agent, which owns the API address in front of the server, applies the
same ``refusal`` (``trellis.proxy.agent.localapi``): so Flask is imported only by ``install``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from trellis.api.errors import PermissionDenied

if TYPE_CHECKING:
    from flask import Flask

    from trellis.api.settings import Settings

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header or origin authority, without port or brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cross_origin(headers: Mapping[str, str], host: str) -> bool:
    """Whether a browser says this request comes from a page of another origin."""
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site:
        return site in ("cross-site", "same-site")
    origin = headers.get("Origin")
    if origin is None:
        return False
    origin = origin.strip().lower()
    if origin == "null":
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return True
    # Same origin: the page's authority is the one this request was sent to.
    want = host.strip().lower()
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    return parts.netloc.removesuffix(default) != want.removesuffix(default)


def allowed_host(host: str, listen_host: str) -> bool:
    """Whether ``trellis dev`` answers a request addressed to ``host`` (see the module doc)."""
    name = _host_name(host).rstrip(".")
    if not name:
        return False
    if _is_ip(name) or name == "localhost" or name.endswith(".localhost"):
        return True
    return name == listen_host.strip().lower().rstrip(".")


def refusal(
    method: str,
    headers: Mapping[str, str],
    mimetype: str,
    *,
    dev: bool,
    listen_host: str,
) -> str | None:
    """Why this request is refused, or None to serve it."""
    host = headers.get("Host", "")
    if dev and not allowed_host(host, listen_host):
        return (
            f"request addressed to host {host!r}: trellis dev answers only requests for"
            " an IP address or localhost (a defence against DNS rebinding)"
        )
    if method in STATE_CHANGING and mimetype != "application/json":
        if cross_origin(headers, host):
            return (
                "a web page of another origin may not change state here; a request from a"
                " page must send Content-Type: application/json (which browsers only send"
                " cross-origin after a CORS preflight, and Trellis approves none)"
            )
    return None


def install(app: Flask, settings: Settings) -> None:
    """Refuse, before any view runs, what ``refusal`` refuses (a 403)."""
    from flask import request

    dev = settings.dev

    @app.before_request
    def _browsers() -> None:
        method = request.method
        changes = method in STATE_CHANGING
        if not changes and not dev:
            return  # a read, outside dev mode: nothing to refuse (on every request: be quick)
        why = refusal(
            method,
            request.headers,
            request.mimetype if changes else "",
            dev=dev,
            listen_host=settings.http_host,
        )
        if why is not None:
            raise PermissionDenied(why)
