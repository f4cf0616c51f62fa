"""Connect for ASGI apps: intentions checked before the app runs, from the ASGI TLS
extension.

Theory of operation
-------------------
An ASGI app never sees its connection; a server that terminates TLS can describe it in the
scope, under ``scope["extensions"]["tls"]`` (the ASGI TLS extension), whose
``client_cert_chain`` holds the client's certificates as PEM, leaf first. The middleware
takes that chain, which is only text in a dict by the time it gets here, and has
``Service.authorize`` verify it in full against the current roots (chain, validity, leaf
profile: ``trellis.connect._chain``) before deciding by the current intentions, on every
request: about 0.2 ms (measured with a one-leaf chain), uncached, since a cache of verdicts
would have to expire with the leaf and follow the roots. The first such call imports
``cryptography`` (some 9 MB).

Servers: the extension is optional, and few servers fill it. hypercorn 0.18 (the one the tests
run) does not: its scopes carry no ``tls`` key even over TLS. Fail closed: a scope with no TLS
extension is answered 403 (and the operator told once, in the log); so is an empty chain,
which is what a server sends for a client with no certificate. Never is a request let through
for want of a peer to decide on. Such a server can still serve Connect: its TLS context is
``Service.server_ssl_context()``, which admits only clients whose leaf the current roots
signed; only the per-intention decision needs the peer in the scope.

``lifespan`` scopes pass through untouched; ``http`` and ``websocket`` scopes are decided,
each request anew.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from trellis.connect._service import Service
from trellis.proxy import der

__all__ = ["NO_EXTENSION", "PEER_ID", "PEER_SERVICE", "ConnectMiddleware", "peer_chain"]

log = logging.getLogger("trellis.connect")

#: The scope key holding the allowed peer's SPIFFE ID (``spiffe://.../svc/web``).
PEER_ID = "trellis.connect.peer_id"
#: The scope key holding the allowed peer's service name (``web``).
PEER_SERVICE = "trellis.connect.peer_service"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The refusal of a scope with no TLS extension (the server's, not the peer's, shortcoming).
NO_EXTENSION = (
    "the server exposes no TLS extension (scope['extensions']['tls']): the peer cannot be "
    "authorized; serve with a server that fills it"
)


def peer_chain(scope: Scope) -> tuple[list[bytes] | None, str]:
    """The client's certificate chain (DER, leaf first) from ``scope``'s TLS extension, or
    None and why there is none. ``client_cert_chain`` is taken as the extension says (an
    iterable of PEM strings) or as one PEM string holding them all (as some servers give
    it). Malformed PEM is the client's or the server's doing: None with the reason."""
    extensions = scope.get("extensions")
    tls = extensions.get("tls") if isinstance(extensions, dict) else None
    if not isinstance(tls, dict):
        return None, NO_EXTENSION
    raw = tls.get("client_cert_chain")
    if isinstance(raw, str | bytes):
        raw = [raw]
    pems: list[str] = []
    try:
        for item in raw or ():
            pems.append(item.decode("ascii") if isinstance(item, bytes) else str(item))
        chain = [c for p in pems for c in der.pem_certificates(p)]
    except (TypeError, UnicodeDecodeError, ValueError, der.DERError) as e:
        return None, f"the client certificate chain does not parse: {e}"
    if not chain:
        return None, "the peer presented no certificate"
    return chain, ""


class ConnectMiddleware:
    """ASGI middleware: each ``http`` or ``websocket`` scope's peer (from the TLS extension)
    is authorized by ``service``'s intentions before ``app`` runs. An allowed one reaches
    ``app`` with the peer's SPIFFE ID in ``scope[PEER_ID]`` and its service name in
    ``scope[PEER_SERVICE]``; any other is refused, ``app`` never called: an ``http`` request
    gets 403 with a JSON body whose ``error`` says why, a ``websocket`` is closed before it is
    accepted (the server answers its handshake 403). No TLS extension in the scope is a
    refusal too, logged once as the deployment's mistake.

    ``service`` is a ``Service`` or a callable returning one (called per scope).
    """

    def __init__(self, app: ASGIApp, service: Service | Callable[[], Service]) -> None:
        self.app = app
        self._service = service
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One scope: refused (403, or a websocket closed unaccepted) for a peer that may not
        call, else handed to ``app`` with the peer in it."""
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        s = self._service
        service = s if isinstance(s, Service) else s()
        chain, reason = peer_chain(scope)
        identity = None
        allowed = False
        if chain is not None:
            decision, identity = service._admit(chain)
            allowed, reason = decision.allowed, decision.reason
        elif reason is NO_EXTENSION and not self._warned:
            self._warned = True
            log.error("%s: refusing every request: %s", service.name, reason)
        if not allowed or identity is None:
            await _refuse(kind, reason, receive, send)
            return
        scope = dict(scope)
        scope[PEER_ID] = identity.uri
        scope[PEER_SERVICE] = identity.service
        await self.app(scope, receive, send)


async def _refuse(kind: str, reason: str, receive: Receive, send: Send) -> None:
    if kind == "websocket":
        # Closing before accepting: the server answers the upgrade with 403. 1008: policy.
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    body = json.dumps({"error": reason, "code": "permission_denied", "status": 403}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
