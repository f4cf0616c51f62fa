"""The agent's way to the servers (``proxy/agent/upstream.py``): keep-alive for reads.

Against a small real HTTP/1.1 server on a loopback socket that counts its connections and
can close a kept connection the way a server's idle timeout (or a restart) does.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio

from trellis.proxy.agent.upstream import Servers, Unreachable


@dataclass
class Counting:
    """Answers every request with 200 ``ok``; ``close_after`` closes a connection after
    that many answers, without a ``Connection: close`` (as an idle timeout does later)."""

    close_after: int = 0
    say_close: bool = False
    drop_before_answer: bool = False
    connections: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, head)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def server() -> Iterator[tuple[str, Counting]]:
    state = Counting()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stopping = threading.Event()
    threads: list[threading.Thread] = []

    def serve_one(conn: socket.socket, n: int) -> None:
        answered = 0
        buf = b""
        with conn:
            while not stopping.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                with state.lock:
                    state.requests.append((n, head))
                if state.drop_before_answer:
                    return
                extra = b"Connection: close\r\n" if state.say_close else b""
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
                answered += 1
                if state.say_close or b"connection: close" in head.lower():
                    return
                if state.close_after and answered >= state.close_after:
                    return

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with state.lock:
                state.connections += 1
                n = state.connections
            t = threading.Thread(target=serve_one, args=(conn, n), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield f"http://127.0.0.1:{port}", state
    stopping.set()
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
    listener.close()
    acceptor.join(5)
    for t in threads:
        t.join(5)


def _calls(url: str, method: str, n: int) -> list[int]:
    async def main() -> list[int]:
        servers = Servers([url])
        out = []
        try:
            for _ in range(n):
                status, value, _ = await servers.call(method, "/v1/kv/k")
                assert value == "ok"
                out.append(status)
        finally:
            await servers.aclose()
        return out

    return trio.run(main)


def test_reads_share_one_kept_connection(server):
    url, state = server
    assert _calls(url, "GET", 10) == [200] * 10
    assert state.connections == 1
    assert all(b"connection: close" not in head.lower() for _, head in state.requests)


def test_a_read_on_a_connection_the_server_closed_is_sent_again_on_a_new_one(server):
    url, state = server
    state.close_after = 1  # every kept connection is gone by the time it is used again
    assert _calls(url, "GET", 5) == [200] * 5
    assert state.connections == 5
    assert len(state.requests) == 5  # each read reached the server once


def test_writes_never_use_a_kept_connection(server):
    # A write sent again after a kept connection failed could be applied twice.
    url, state = server
    assert _calls(url, "PUT", 3) == [200] * 3
    assert state.connections == 3
    assert all(b"connection: close" in head.lower() for _, head in state.requests)


def test_a_connection_the_server_said_it_closes_is_not_kept(server):
    url, state = server
    state.say_close = True
    assert _calls(url, "GET", 3) == [200] * 3
    assert state.connections == 3


def test_a_fresh_connection_dropped_before_the_answer_is_not_retried_forever(server):
    # The retry is for kept connections only: a new one that fails is the server's failure.
    url, state = server
    state.drop_before_answer = True
    with pytest.raises(Unreachable):
        _calls(url, "GET", 1)
    assert state.connections == 1


def test_a_failure_drops_the_kept_connections_to_that_server(server):
    # A connection kept from before may reach a server process that is going away (its
    # workers drain after the master stopped listening), whose answer would hide the failure
    # the agent just saw: after a failure, reads start again on new connections.
    url, state = server

    async def main() -> None:
        servers = Servers([url])
        try:
            assert (await servers.call("GET", "/v1/kv/k"))[0] == 200  # connection 1, kept
            state.drop_before_answer = True
            with pytest.raises(Unreachable):
                await servers.call("PUT", "/v1/kv/k")  # connection 2, dropped: a failure
            state.drop_before_answer = False
            assert (await servers.call("GET", "/v1/kv/k"))[0] == 200
        finally:
            await servers.aclose()

    trio.run(main)
    assert state.connections == 3
    assert [n for n, _ in state.requests] == [1, 2, 3]
