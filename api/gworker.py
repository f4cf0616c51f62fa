"""Trellis's gunicorn worker: gevent, with each response's head and body in one send.

gunicorn writes the status line and headers with one ``sendall`` and the body with another.
For the small JSON answers of this API that is two system calls (and, under gevent, two trips
through the socket wrapper) per response, which showed as a large share of the time it takes
one write to answer a thousand parked blocking queries. The wrapper below holds the head back
until the first body write (or the end of the response) and sends both together.

The wrapper is also how a parked blocking query (``trellis.api.longpoll``) watches its client's
socket (``on_readable``, ``peer_closed``) and marks itself woken (``woken``), so that the worker
lets the rest of a woken batch answer before this connection reads its next request.
"""

from __future__ import annotations

import _socket
import os
import socket
from collections.abc import Callable
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker


class _Corked:
    """A client socket whose first ``sendall`` of a response waits for the second."""

    __slots__ = ("_head", "_sock", "woken")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._head: bytes | None = None
        #: Set by ``trellis.api.longpoll`` (through ``environ["gunicorn.socket"]``) when this
        #: request was a parked blocking query that a change woke.
        self.woken = False

    def sendall(self, data: bytes) -> None:
        if self._head is None:
            self._head = bytes(data)
            return
        if self._head:
            data = self._head + data
            self._head = b""
        self._sock.sendall(data)

    def on_readable(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (in the hub) when the client socket turns readable: the client
        sent more, or closed its end. Returns the function that stops watching."""
        watcher = gevent.get_hub().loop.io(self._sock.fileno(), 1)
        watcher.start(callback)

        def stop() -> None:
            watcher.stop()
            watcher.close()

        return stop

    def peer_closed(self) -> bool:
        """Whether the client has closed (or reset) its end. Reads nothing: a pipelined
        request stays in the socket for gunicorn to parse."""
        # A probe on a duplicate of the descriptor, from the unpatched socket module: gevent's
        # socket would park on EAGAIN instead of returning. Closing the duplicate leaves the
        # connection open.
        probe = _socket.socket(fileno=os.dup(self._sock.fileno()))
        try:
            return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True  # reset
        finally:
            probe.close()

    def flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self._sock.sendall(head)

    def __getattr__(self, name: str) -> Any:
        # Anything but sendall (shutdown, close, sendfile, fileno...) goes to the socket, after
        # whatever head is held back.
        self.flush()
        return getattr(self._sock, name)


class TrellisGeventWorker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[Any] = set()  # every open client connection
        self._busy: dict[Any, Any] = {}  # those in the middle of a request: socket -> request

    def run(self) -> None:
        gevent.spawn(self._drain_when_stopping)
        super().run()

    def _drain_when_stopping(self) -> None:
        """On a graceful stop (SIGTERM), end what would hold the worker until gunicorn's
        graceful timeout cuts it off (5 s, and a warning): parked blocking queries answer at
        once with what they have (``ChangeFeed.drain``; gunicorn adds ``Connection: close``
        once the worker is stopping), and idle keep-alive connections are closed for reading,
        which ends their wait for a next request."""
        while self.alive:
            gevent.sleep(0.2)
        for req in list(self._busy.values()):
            req.must_close = True  # their answers say Connection: close
        services = getattr(self.wsgi, "extensions", {}).get("trellis")
        if services is not None:
            services.store.feed.drain()
        for sock in list(self._connections - self._busy.keys()):
            try:
                sock.shutdown(socket.SHUT_RD)  # a request already read still gets its answer
            except OSError:
                pass  # already gone

    def handle(self, listener, client, addr):  # type: ignore[no-untyped-def]
        self._connections.add(client)
        try:
            return super().handle(listener, client, addr)
        finally:
            self._connections.discard(client)

    def handle_request(self, listener_name, req, sock, addr):  # type: ignore[no-untyped-def]
        self._busy[sock] = req
        try:
            return self._handle_request(listener_name, req, sock, addr)
        finally:
            self._busy.pop(sock, None)

    def _handle_request(self, listener_name, req, sock, addr):  # type: ignore[no-untyped-def]
        corked = _Corked(sock)
        try:
            return super().handle_request(listener_name, req, corked, addr)
        finally:
            try:
                corked.flush()
            except OSError:
                pass  # the client went away; gunicorn's own handling has seen to it
            if corked.woken:
                # One write wakes a thousand parked queries in one pass of the hub. Without
                # this yield, each would set up gunicorn's keep-alive read (a Timeout, a parser,
                # a recv that would block) before the next could answer; with it, all answer
                # first and that bookkeeping follows. Only woken queries pay for the trip
                # through the hub.
                gevent.sleep(0)
