"""A connection that fails the moment its relay starts ends alone; the reactor goes on.

The relay's start reads what may already wait on either side (no new edge would announce it),
so that first read can meet a reset. It once escaped from ``Pipe.start`` into the reactor's
loop and stopped the whole proxy: after the public listener stopped sending TLS 1.3 session
tickets, an upstream that closed right after its handshake (a refusal) did it in four runs of
five of test_proxy_reactor.py's 40-connection test.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

import trio

from tests.mesh_support import MeshCA, snapshot
from tests.test_proxy_reactor import _pair, _pipe, _run_with_reactor
from trellis.proxy import reactor as rx


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_reset_met_when_the_relay_starts_ends_that_connection_only():
    ca = MeshCA()
    server_snap = snapshot(ca, "db", default_allow=True)
    client_snap = snapshot(ca, "web")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]

    def body(r: rx.Reactor) -> None:
        ended: list[str] = []
        local_out, local_in = _pair()

        def start() -> None:
            rx.Outbound(
                r,
                local_in,
                client_snap.tls.client,
                client_snap.tls.peers,
                [("127.0.0.1", port)],
                lambda v: client_snap.check_upstream(v, "db"),
                rx.Timeouts(connect=5),
                lambda conn, reason: ended.append(reason),
            )

        trio.from_thread.run_sync(start)
        up, _ = ls.accept()
        up.settimeout(5)
        # The upstream's side of the handshake, over memory: read the ClientHello, make the
        # server's whole flight (the client completes its handshake on it).
        s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = server_snap.tls.server.wrap_bio(s_in, s_out, server_side=True)
        while not s_out.pending:
            s_in.write(up.recv(65536))
            try:
                server.do_handshake()
            except ssl.SSLWantReadError:
                pass
        flight = s_out.read()

        def flight_then_local_reset() -> None:
            # In the reactor's own thread, between two batches of events: the next batch
            # holds the upstream's flight (first) and the local client's reset, so the relay
            # starts right after the handshake and its first read of the local side fails.
            up.sendall(flight)
            _reset(local_out)

        trio.from_thread.run_sync(flight_then_local_reset)
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["reset by peer"]
        up.close()

        # The reactor still serves: a plain relay carries bytes.
        a_out, a_in = _pair()
        b_out, b_in = _pair()
        _pipe(r, a_in, b_in, [])
        a_out.sendall(b"still here")
        b_out.settimeout(5)
        assert b_out.recv(64) == b"still here"
        for s in (a_out, b_out):
            s.close()

    _run_with_reactor(body)
    ls.close()
