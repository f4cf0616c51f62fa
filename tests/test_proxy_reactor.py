"""The byte path on real loopback sockets: relaying, half-close, backpressure, end of stream
arriving with the last bytes, timeouts, and an upstream that refuses after its handshake.

The reactor runs as a trio task (``Reactor.run``); the peers are plain blocking sockets in
threads, so each case controls exactly what arrives when.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import ssl
import struct
import termios
import threading
import time

import trio

from tests.mesh_support import MeshCA, snapshot
from tests.support import wait_until
from trellis.proxy import reactor as rx
from trellis.proxy.snapshot import PeerVerdict


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (outer, inner); ``inner`` goes into the reactor."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        outer = socket.create_connection(ls.getsockname())
        inner, _ = ls.accept()
    inner.setblocking(False)
    return outer, inner


def _run_with_reactor(body) -> None:
    """Run ``body(reactor)`` (a sync function, in a thread) while the reactor serves."""

    async def main():
        r = rx.Reactor()
        async with trio.open_nursery() as n:
            n.start_soon(r.run)
            await trio.to_thread.run_sync(body, r)
            r.close()
            n.cancel_scope.cancel()

    trio.run(main)


def _pipe(r: rx.Reactor, a: socket.socket, b: socket.socket, ended: list) -> rx.Pipe:
    """A plain-to-plain pipe registered in ``r`` (from another thread: the registration is
    made through trio's thread API so the reactor's state is touched in its own thread)."""
    ea, eb = rx.End(a), rx.End(b)
    holder: list = []

    def close(reason: str) -> None:  # what a connection does (Inbound.close): once
        if not ended:
            ended.append(reason)
            for end in (ea, eb):
                r.remove(end.sock)
                end.close()

    def make():
        p = rx.Pipe(r, ea, eb, "inbound", close)
        r.add(a, p)
        r.add(b, p)
        p.start()
        holder.append(p)

    trio.from_thread.run_sync(make)
    return holder[0]


def test_relay_carries_bytes_and_half_close_both_ways():
    def body(r):
        c_out, c_in = _pair()
        s_out, s_in = _pair()
        ended: list = []
        _pipe(r, c_in, s_in, ended)
        c_out.sendall(b"request")
        c_out.shutdown(socket.SHUT_WR)  # the client is done sending...
        got = b""
        s_out.settimeout(5)
        while chunk := s_out.recv(100):  # ...so the server sees the end after the bytes
            got += chunk
        assert got == b"request"
        s_out.sendall(b"response")  # ...and can still answer
        s_out.close()
        c_out.settimeout(5)
        assert c_out.recv(100) == b"response"
        assert c_out.recv(100) == b""
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["closed"]
        c_out.close()

    _run_with_reactor(body)


def test_a_slow_reader_gets_every_byte_and_the_relay_buffers_little():
    payload = bytes(range(256)) * (40 * 1024)  # 10 MiB

    def body(r):
        c_out, c_in = _pair()
        s_out, s_in = _pair()
        pipe = _pipe(r, c_in, s_in, [])
        sender = threading.Thread(target=c_out.sendall, args=(payload,))
        sender.start()
        digest = hashlib.sha256()
        received = 0
        most_pending = 0
        s_out.settimeout(10)
        while received < len(payload):
            chunk = s_out.recv(4096)
            assert chunk
            digest.update(chunk)
            received += len(chunk)
            if received % (1 << 20) < 4096:
                time.sleep(0.02)  # a slow app: the relay must wait, not buffer everything
            most_pending = max(most_pending, len(pipe.b.pending))
        sender.join(10)
        assert digest.digest() == hashlib.sha256(payload).digest()
        # At most one read's worth waits in the relay; the rest stays in the kernel, where
        # TCP flow control pushes back on the sender.
        assert most_pending <= rx.BUFFER
        c_out.close()
        s_out.close()

    _run_with_reactor(body)


def test_the_end_of_stream_that_arrives_with_the_last_bytes_is_not_lost():
    # Data and FIN in one edge: a short read must not be taken for "empty until the next
    # event", or the FIN is never seen and the other side hangs (found with TLS tickets).
    def body(r):
        for _ in range(30):
            c_out, c_in = _pair()
            s_out, s_in = _pair()
            s_out.sendall(b"bye")
            s_out.shutdown(socket.SHUT_WR)
            time.sleep(0.002)  # both are in the kernel before the reactor looks
            _pipe(r, c_in, s_in, [])
            c_out.settimeout(3)
            assert c_out.recv(10) == b"bye"
            assert c_out.recv(10) == b""
            c_out.close()
            s_out.close()

    _run_with_reactor(body)


def test_an_upstream_that_closes_after_its_handshake_ends_the_local_connection():
    # The server side of a denied connection: it completes the handshake, then closes
    # (TLS 1.3 session tickets and the FIN arrive together). The local client must see the
    # connection end, every time (it hung one time in six before the fix).
    ca = MeshCA()
    server_snap = snapshot(ca, "db", default_allow=True)
    # Trellis servers issue no tickets; other mesh servers may, and the tickets arriving with
    # the FIN are what made this case hang.
    server_snap.tls.server.num_tickets = 2
    client_snap = snapshot(ca, "web")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    port = ls.getsockname()[1]
    stop = threading.Event()

    def refusing_server():
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            try:
                t = server_snap.tls.server.wrap_socket(c, server_side=True)
                t.close()
            except (ssl.SSLError, OSError):
                c.close()

    threading.Thread(target=refusing_server, daemon=True).start()

    def body(r):
        ended: list = []
        try:
            for _ in range(40):
                local_out, local_in = _pair()

                def start(local_in=local_in):
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

                local_out.sendall(b"hello")
                trio.from_thread.run_sync(start)
                local_out.settimeout(3)
                try:
                    assert local_out.recv(10) == b""
                except ConnectionResetError:
                    pass  # closed with our bytes unread: closed all the same
                local_out.close()
        finally:
            stop.set()
        deadline = time.monotonic() + 3
        while len(ended) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)  # the last close reports right after it closed the socket
        assert len(ended) == 40

    _run_with_reactor(body)
    ls.close()


def test_handshakes_that_never_finish_are_cut_by_the_sweep():
    ca = MeshCA()
    snap = snapshot(ca, "db", default_allow=True)

    def body(r):
        ended: list = []
        c_out, c_in = _pair()

        def start():
            rx.Inbound(
                r,
                c_in,
                snap.tls.server,
                snap.tls.peers,
                lambda conn, v: rx.Route(True, "", ("127.0.0.1", 1)),
                rx.Timeouts(handshake=0.2),
                lambda conn, reason: ended.append(reason),
            )

        trio.from_thread.run_sync(start)
        time.sleep(0.3)
        trio.from_thread.run_sync(lambda: r.sweep(time.monotonic()))
        assert ended == ["handshake timed out"]
        c_out.settimeout(3)
        assert c_out.recv(10) == b""
        c_out.close()

    _run_with_reactor(body)


def test_a_peer_verdict_without_identity_is_refused_before_any_app_connection():
    ca = MeshCA()
    snap = snapshot(ca, "db", default_allow=True)
    routes: list[PeerVerdict] = []

    def body(r):
        ended: list = []
        c_out, c_in = _pair()

        def refuse(conn, verdict):
            routes.append(verdict)
            return rx.Route(False, "no")

        def start():
            rx.Inbound(
                r,
                c_in,
                snap.tls.server,
                snap.tls.peers,
                refuse,
                rx.Timeouts(),
                lambda conn, reason: ended.append(reason),
            )

        trio.from_thread.run_sync(start)
        client = snapshot(ca, "web").tls.client.wrap_socket(c_out, server_side=False)
        client.settimeout(3)
        try:
            assert client.recv(10) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        client.close()
        deadline = time.monotonic() + 3
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["no"]
        assert routes and routes[0].identity is not None and routes[0].identity.service == "web"

    _run_with_reactor(body)


class _TLSClient:
    """A mesh client over a raw socket, driving its TLS by hand (memory BIOs), so a test
    decides exactly which ciphertext reaches the sidecar in which ``send``."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_side=False)
        sock.settimeout(5)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                self.inc.write(self.sock.recv(65536))
        self.sock.sendall(self.out.read())

    def records(self, data: bytes) -> bytes:
        """The ciphertext of ``data``, not sent."""
        self.tls.write(data)
        return self.out.read()

    def close_notify(self) -> bytes:
        """The ciphertext of a close_notify alert, not sent."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.out.read()


def _inbound_to_app(r, server_snap, client_snap):
    """An inbound connection through the reactor to a plain app socket: (client, app, conn)."""
    app_listener = socket.socket()
    app_listener.bind(("127.0.0.1", 0))
    app_listener.listen(1)
    c_out, c_in = _pair()
    held: list = []

    def start():
        held.append(
            rx.Inbound(
                r,
                c_in,
                server_snap.tls.server,
                server_snap.tls.peers,
                lambda conn, v: rx.Route(True, "", app_listener.getsockname()),
                rx.Timeouts(),
                lambda conn, reason: None,
            )
        )

    trio.from_thread.run_sync(start)
    client = _TLSClient(c_out, client_snap.tls.client)
    app_listener.settimeout(5)
    app, _ = app_listener.accept()
    app_listener.close()
    app.settimeout(5)
    return client, app, held[0]


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in the kernel for ``sock`` (FIONREAD; reads nothing)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"end of stream after {len(got)} of {n} bytes"
        got += chunk
    return got


def test_tls_records_split_across_reads_and_many_records_per_read_arrive_whole():
    # The relay's one-read path takes one record per event; a record cut in two (the rest
    # in a later edge) and a read holding many records must both reach the app whole.
    ca = MeshCA()
    server_snap, client_snap = snapshot(ca, "db", default_allow=True), snapshot(ca, "web")

    def body(r):
        client, app, conn = _inbound_to_app(r, server_snap, client_snap)
        try:
            for size in (1, 100, 5000):
                data = bytes(range(256)) * (size // 256 + 1)
                wire = client.records(data[:size])
                client.sock.sendall(wire[:7])  # not even a whole record header
                wait_until(lambda: _unread(conn.down.sock) == 0)  # the reactor took them
                client.sock.sendall(wire[7:])
                assert _recv_exactly(app, size) == data[:size]
            big = hashlib.sha256(b"seed").digest() * (300_000 // 32)  # ~19 records
            client.sock.sendall(client.records(big))
            assert _recv_exactly(app, len(big)) == big
            app.sendall(b"still there")
            client.inc.write(client.sock.recv(65536))
            assert client.tls.read(100) == b"still there"
        finally:
            client.sock.close()
            app.close()

    _run_with_reactor(body)


def test_data_and_close_notify_in_one_read_deliver_the_data_then_the_end():
    ca = MeshCA()
    server_snap, client_snap = snapshot(ca, "db", default_allow=True), snapshot(ca, "web")

    def body(r):
        client, app, _ = _inbound_to_app(r, server_snap, client_snap)
        try:
            client.sock.sendall(client.records(b"last words") + client.close_notify())
            assert _recv_exactly(app, 10) == b"last words"
            assert app.recv(10) == b""  # the end of stream, though no FIN came
        finally:
            client.sock.close()
            app.close()
        # The same with several records before the alert (decrypted together, one write).
        client, app, _ = _inbound_to_app(r, server_snap, client_snap)
        try:
            data = bytes(range(256)) * 160  # 40 KiB: three records
            client.sock.sendall(client.records(data) + client.close_notify())
            assert _recv_exactly(app, len(data)) == data
            assert app.recv(10) == b""
        finally:
            client.sock.close()
            app.close()

    _run_with_reactor(body)


def test_a_close_notify_alone_ends_the_apps_stream_and_the_answer_still_flows():
    ca = MeshCA()
    server_snap, client_snap = snapshot(ca, "db", default_allow=True), snapshot(ca, "web")

    def body(r):
        client, app, _ = _inbound_to_app(r, server_snap, client_snap)
        try:
            client.sock.sendall(client.records(b"question"))
            assert _recv_exactly(app, 8) == b"question"
            client.sock.sendall(client.close_notify())  # its own edge, no FIN
            assert app.recv(10) == b""
            app.sendall(b"answer")  # a half-closed connection still carries the answer
            answer = b""
            while len(answer) < 6:
                client.inc.write(client.sock.recv(65536))
                try:
                    answer += client.tls.read(100)
                except ssl.SSLWantReadError:
                    pass
            assert answer == b"answer"
        finally:
            client.sock.close()
            app.close()

    _run_with_reactor(body)
