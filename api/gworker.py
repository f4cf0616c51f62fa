"""Trellis's gunicorn worker: gevent, with each response's head and body in one send.

gunicorn writes the status line and headers with one ``sendall`` and the body with another.
For the small JSON answers of this API that is two system calls (and, under gevent, two trips
through the socket wrapper) per response, which showed as a large share of the time it takes
one write to answer a thousand parked blocking queries. The wrapper below holds the head back
until the first body write (or the end of the response) and sends both together.

The wrapper is also how a parked blocking query (``trellis.api.longpoll``) watches its client's
socket (``on_readable``, ``peer_closed``) and marks itself woken (``woken``), so that the worker
lets the rest of a woken batch answer before this connection reads its next request.

Slow and greedy clients
-----------------------
A gevent worker holds up to ``worker_connections`` connections, and each costs a greenlet for
as long as it stays open. gunicorn's own timer (the keep-alive timeout, ``http_idle_timeout``)
bounds only the wait for a request head; a client that sends a head promising a body and then
stalls held its slot for good, and a few thousand such clients took every slot of a worker.
So every connection goes through ``_Guarded``, which gives each ``recv`` a deadline:

* a new connection must send its first request head within ``http_header_timeout`` of being
  accepted; between requests an idle keep-alive connection waits up to ``http_idle_timeout``
  (gunicorn's timer), and once the first byte of a head has arrived, the rest must follow
  within ``http_header_timeout``. A head that runs out is treated as the client having gone:
  the connection is closed without an answer, as gunicorn closes an idle one;
* from the end of the head, the body must arrive within ``http_body_timeout``. A body that
  runs out raises ``RequestTimeout`` inside the view that reads it: the client gets a 408
  and the connection is closed (the rest of the body would otherwise be read as a request).

And ``handle`` counts the open connections of each client address (an IPv6 client by its /64,
which one host usually holds whole): past ``http_max_conns_per_client`` a new connection gets
a 429 and is closed before anything is read, so one address cannot take a worker's slots from
everyone else. The count is per worker process (the kernel spreads connections over the
workers), so a client may hold up to workers x the cap in all.

gunicorn internals this module relies on (AsyncWorker.handle/handle_request and their
arguments, the parsed request's ``body`` and ``must_close``, ``environ["gunicorn.socket"]``)
are pinned in setup.cfg and their shape is checked by tests/test_gworker_contract.py.
"""

from __future__ import annotations

import _socket
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.socket import cancel_wait_ex
from gunicorn.workers.ggevent import GeventWorker

from trellis.api.errors import RequestTimeout, TooManyConnections
from trellis.api.peers import client_key
from trellis.api.settings import Settings

log = logging.getLogger("trellis.server")

#: How often (seconds) the worker may log that it refused a client's connection.
_REFUSAL_LOG_INTERVAL = 10.0


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


class _Guarded:
    """A client connection whose reads have deadlines (see "Slow and greedy clients")."""

    __slots__ = ("_body_timeout", "_header_timeout", "_sock", "deadline", "idle", "req")

    def __init__(self, sock: Any, header_timeout: float, body_timeout: float) -> None:
        self._sock = sock
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        #: time.monotonic() by which the current read must be done; None: gunicorn's timer.
        self.deadline: float | None = time.monotonic() + header_timeout
        #: Between requests: nothing of the next head has arrived yet.
        self.idle = False
        #: The request whose body is being read (between its head and its answer).
        self.req: Any = None

    def request_started(self, req: Any) -> None:
        self.req = req
        self.idle = False
        self.deadline = time.monotonic() + self._body_timeout

    def request_done(self) -> None:
        self.req = None
        self.idle = True
        self.deadline = None

    def recv(self, n: int) -> bytes:
        try:
            data = self._recv(n)
        except cancel_wait_ex:
            # gevent's shutdown(SHUT_RD) (the worker's drain on a graceful stop, see
            # TrellisGeventWorker._drain_when_stopping) wakes a parked recv with this error
            # rather than with the end of stream; for the connection it means the same: no
            # next request. Raised, gunicorn logged it as an ERROR traceback per connection.
            return b""
        if self.idle and data:
            # The first byte of the next request: its head is now on the clock.
            self.idle = False
            self.deadline = time.monotonic() + self._header_timeout
        return data

    def _recv(self, n: int) -> bytes:
        deadline = self.deadline
        if deadline is None:
            data: bytes = self._sock.recv(n)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._expired()
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(n)
            except TimeoutError:
                return self._expired()
            finally:
                self._sock.settimeout(None)
        return data

    def _expired(self) -> bytes:
        if self.req is None:
            return b""  # a head that never came: as if the client had closed
        self.req.must_close = True  # the rest of the body must not be read as a request
        raise RequestTimeout(
            f"the request body did not arrive within {self._body_timeout:g}s"
            " (limits.http_body_timeout)"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class TrellisGeventWorker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[Any] = set()  # every open client connection
        self._busy: dict[Any, Any] = {}  # those in the middle of a request: socket -> request
        self._per_client: dict[str, int] = {}  # open connections by client_key
        self._last_refusal_log = 0.0
        self._refused = 0
        # Settings' defaults, until run() reads the app's own settings.
        self.max_conns_per_client = Settings.http_max_conns_per_client
        self.header_timeout = Settings.http_header_timeout
        self.body_timeout = Settings.http_body_timeout

    def run(self) -> None:
        services = getattr(self.wsgi, "extensions", {}).get("trellis")
        if services is not None:
            s = services.settings
            self.max_conns_per_client = s.http_max_conns_per_client
            self.header_timeout = s.http_header_timeout
            self.body_timeout = s.http_body_timeout
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
        key = client_key(addr)
        held = self._per_client.get(key, 0)
        cap = self.max_conns_per_client
        if cap and held >= cap:
            self._refuse(client, key)
            return None
        self._per_client[key] = held + 1
        guarded = _Guarded(client, self.header_timeout, self.body_timeout)
        self._connections.add(guarded)
        try:
            return super().handle(listener, guarded, addr)
        finally:
            self._connections.discard(guarded)
            left = self._per_client[key] - 1
            if left:
                self._per_client[key] = left
            else:
                del self._per_client[key]

    def _refuse(self, client: Any, key: str) -> None:
        """Answer 429 and close, without reading: the client already holds its share."""
        error = TooManyConnections(
            f"too many connections from {key}: at most {self.max_conns_per_client} per client"
            " (limits.http_max_conns_per_client)"
        )
        body = json.dumps(error.to_json()).encode()
        head = (
            "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            client.setblocking(False)  # a fresh socket's send buffer takes it, or never mind
            client.send(head + body)
        except OSError:
            pass
        finally:
            client.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            # One line per interval, whatever the rate: a flood must not also flood the log.
            self._last_refusal_log = now
            log.warning(
                "refused %d connection(s) over limits.http_max_conns_per_client (%d), the"
                " latest from %s",
                self._refused,
                self.max_conns_per_client,
                key,
            )
            self._refused = 0

    def handle_request(self, listener_name, req, sock, addr):  # type: ignore[no-untyped-def]
        self._busy[sock] = req
        guarded = sock if isinstance(sock, _Guarded) else None
        if guarded is not None:
            guarded.request_started(req)
        try:
            return self._handle_request(listener_name, req, sock, addr)
        finally:
            self._busy.pop(sock, None)
            if guarded is not None:
                guarded.request_done()

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
