"""The public listener's TLS context issues no session tickets.

Trellis never resumes a session (each connection is a full mutual-TLS handshake, so a
revoked or rotated leaf is never carried over), so a ticket is pure cost: by default
OpenSSL's TLS 1.3 server sends two after each handshake, which costs the server two ticket
encryptions per connection and the client about 17 KB of session state per open connection
(measured with 1,000 connections, issue 10).
"""

from __future__ import annotations

import ssl

from tests.mesh_support import MeshCA
from trellis.proxy import tls


def _handshake_and_one_byte(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    s.write(b"x")
    c_in.write(s_out.read())
    assert c.read(1) == b"x"  # reading the byte processes whatever came before it
    return c


def test_the_server_context_sends_no_session_ticket():
    ca = MeshCA()
    web, db = ca.leaf("web"), ca.leaf("db")
    roots = [ca.root_pem]
    server = tls.server_context(
        cert_pem=db.cert_pem, chain_pem=[], key_pem=db.key_pem, roots_pem=roots
    )
    client = tls.client_context(
        cert_pem=web.cert_pem, chain_pem=[], key_pem=web.key_pem, roots_pem=roots
    )
    c = _handshake_and_one_byte(server, client)
    assert c.version() == "TLSv1.3"
    assert c.session is not None
    assert not c.session.has_ticket
    assert server.num_tickets == 0
