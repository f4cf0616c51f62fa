"""One ``ssl.SSLContext`` a server keeps for ever, that serves each new connection with the
current snapshot's leaf and roots.

Theory of operation
-------------------
A server (gunicorn, hypercorn, ``asyncio.start_server``, ``trio.SSLStream``) takes its
``SSLContext`` once, at start. Rebuilding it for a rotated leaf or new roots would mean a
restart. Instead the context handed out is a *switch*: its ``sni_callback`` runs during every
handshake, right after the ClientHello (OpenSSL calls it whether or not the client sent a
server name), and sets the connection's context to the one the follower built for the current
snapshot (``TLSMaterial.server``, built once per leaf or roots change, about 1 ms each, and
shared by every connection made under that snapshot). From then on the handshake presents that
context's leaf and verifies the client's chain against that context's roots: OpenSSL takes the
certificate and the trust store from the connection's current context.

What does *not* switch is fixed at the connection's creation, from the switch itself, so the
switch carries the same settings as every snapshot's context: a client certificate is required
(``CERT_REQUIRED``), TLS 1.2 at the least, no session tickets (a connection always proves the
current leaf). With no snapshot ready yet, the handshake fails with an alert: the server cannot
serve what it does not have (fail closed).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from trellis.proxy import tls


def switching_context(current: Callable[[], ssl.SSLContext | None]) -> ssl.SSLContext:
    """A server context that serves every new handshake with ``current()``'s leaf and roots
    (``None``: refuse the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION

    def switch(
        conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> int | None:
        target = current()
        if target is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        conn.context = target
        return None

    ctx.sni_callback = switch
    return ctx
