"""Blocking queries: parked outside the view, and a woken batch answered with one rendering.

This is the one way Trellis waits for a change. Every blocking read goes through it: the
``?index=`` reads of K/V, the catalog, health and the CA, the agent's ``?hash=`` reads, and
the agent leaf (``?index=``, also due at the leaf's renewal time). A view asks for it with
``trellis.api.http.blocking`` or ``hash_blocking``; which kind of version the client holds (an
index, a content hash) is a ``Since``.

Theory of operation
-------------------
A blocking query that has nothing new to return does not wait inside its view. It raises
``Parked``; the app turns that into a ``ParkedResponse``, and Flask finishes the request as
usual (after-request hooks, context teardown). The WSGI server then iterates the response,
and the iteration is where the query waits on the change feed:

1. When a change wakes it (or ``wait`` runs out), it runs the view again, in a fresh request
   context on the same environ, marked as a re-run (``RERUN``). ``blocking`` then reads through
   the shared reads instead of the store, and either returns the new result (the view renders
   it; the response is sent) or raises ``Park`` again (the change did not give the client
   anything new: wait on).
2. One write can wake a thousand queries for the same read (path, arguments, token). The first
   to run renders the response; the others woken with it take the rendered bytes from the same
   single-flight table and send them, without running the view, Flask's request handling or
   JSON encoding again. That is what keeps a thousand wake-ups within a hundred milliseconds on
   two cores. A rendering serves a query only if its version (``X-Consul-Index`` or
   ``X-Consul-ContentHash``) is news to that query's client (``Since.is_new``).
3. A result can also go stale with no write at all: an agent leaf falls due for renewal. Such
   a query parks with a ``recheck`` time; when it comes, the view runs again alone, reading
   afresh (``Park.timed``), not through the shared reads, whose entries only know about writes.

A query ends early, with what it has, as at its deadline, when the server stops (SIGTERM:
``ChangeFeed.drain``). A query whose client closes the connection while parked ends at once
(see ``wait_for_change``); to the WSGI server it looks like a connection reset. And one client
address may hold at most ``blocking.max_per_client`` parked queries per server process
(``ParkedClients``): past that, a new query answers at once with what it has instead of
parking, so that one client cannot fill a worker with parked queries.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from flask import Flask, Response

from trellis.api.feed import ChangeFeed, SharedReads, Watch

#: Environ key: the ``Park`` of the query being re-run after a wake-up or at its deadline.
RERUN = "trellis.longpoll"

#: Statuses whose rendering a woken batch may share: the answers a read gives. Anything else
#: (a 403 after a token was deleted, a 503) is rendered by each query for itself.
SHAREABLE = frozenset({200, 404})

INDEX_HEADER = "X-Consul-Index"
HASH_HEADER = "X-Consul-ContentHash"


@dataclass(frozen=True)
class Since:
    """The version of the result the client already holds, and how to tell a newer one.

    ``Since.index(n)``: Consul's ``?index=n``, news is an index above n. ``Since.hash(h)``: the
    agent's ``?hash=h``, news is any other content hash. ``Since.changed(n)``: an ``?index=n``
    that is no position in the store but a digest (``event/list``'s, see trellis.api.events),
    news is any other index. ``header`` is the response header that carries a rendered
    result's version.
    """

    header: str
    held: str
    #: Whether versions are ordered (an index that grows), or only equal or not.
    ordered: bool = True

    @classmethod
    def index(cls, min_index: int) -> Since:
        return cls(INDEX_HEADER, str(min_index))

    @classmethod
    def hash(cls, want: str) -> Since:
        return cls(HASH_HEADER, want)

    @classmethod
    def changed(cls, index: int) -> Since:
        return cls(INDEX_HEADER, str(index), ordered=False)

    def is_new(self, version: str) -> bool:
        if self.header == INDEX_HEADER and self.ordered:
            return int(version or 0) > int(self.held)
        return version != self.held

    def ahead_of(self, version: str) -> bool:
        """The client's index is above the result's (it may come from another store)."""
        return self.header == INDEX_HEADER and self.ordered and int(version or 0) < int(self.held)


@dataclass(frozen=True)
class Park:
    """Why and until when a blocking query waits."""

    watch: Watch
    pos: int  # the feed position its last result covers
    deadline: float  # time.monotonic() at which it answers with what it has
    key: tuple  # what identifies its read (path, arguments, token), see api.http._read_key
    since: Since  # what the client holds
    seen: str  # the version of its last result (not news to the client, or it would not wait)
    #: time.monotonic() at which its result may have changed without a write (a leaf due for
    #: renewal): the view runs again then, reading afresh. ``math.inf``: only writes matter.
    recheck: float = math.inf
    #: Set on the re-run at ``recheck``: read the store, not the shared reads.
    timed: bool = False


class Parked(Exception):
    """Raised by ``trellis.api.http.blocking`` to park the query outside the view."""

    def __init__(self, park: Park) -> None:
        super().__init__("parked")
        self.park = park


class ClientGone(ConnectionResetError):
    """The client closed its connection while its query waited. Raised from a parked query's
    iterable, gunicorn takes it as a reset connection and closes it quietly."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNRESET, "the client closed the connection")


@dataclass(frozen=True)
class Rendered:
    """What a woken query's view answered, for the others woken with it."""

    version: str  # of the result: its index or content hash (see Since)
    status: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    shareable: bool = False  # False: re-run the view (an error, or parked again)


class ParkedClients:
    """How many queries each client address has parked in this process, capped.

    ``blocking`` asks ``full`` before it parks a fresh query; ``_LongPoll`` counts a query in
    (``add``) when the WSGI server takes its response and out (``remove``) when it ends,
    however it ends. Between the two there is no I/O, so under gevent no other request can
    slip in between the check and the count.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def full(self, client: str) -> bool:
        return self._count.get(client, 0) >= self.cap

    def add(self, client: str) -> None:
        with self._lock:
            self._count[client] = self._count.get(client, 0) + 1

    def remove(self, client: str) -> None:
        with self._lock:
            n = self._count.get(client, 0) - 1
            if n > 0:
                self._count[client] = n
            else:
                self._count.pop(client, None)


class ParkedResponse(Response):
    """The response of a parked query: it waits when the WSGI server iterates it."""

    def __init__(self, app: Flask, park: Park) -> None:
        super().__init__()
        self._app = app
        self.park = park

    def __call__(self, environ: dict, start_response: Any) -> Any:  # type: ignore[override]
        return _LongPoll(self._app, environ, start_response, self.park)


def install(app: Flask) -> None:
    """Turn ``Parked`` into a ``ParkedResponse`` (the most specific handler wins)."""

    @app.errorhandler(Parked)
    def _park(e: Parked) -> Response:
        return ParkedResponse(app, e.park)


def client_address(environ: dict) -> str:
    """The address a per-client limit counts against."""
    return str(environ.get("REMOTE_ADDR") or "")


class _LongPoll:
    """The WSGI iterable of a parked query (see the module docstring)."""

    def __init__(self, app: Flask, environ: dict, start_response: Any, park: Park) -> None:
        self.app = app
        self.environ = environ
        self.start_response = start_response
        self.park = park
        services = app.extensions["trellis"]
        self.feed: ChangeFeed = services.store.feed
        self.shared: SharedReads = services.shared_reads
        self.client = client_socket(environ)
        self._last_park = park
        self._clients: ParkedClients = services.parked_clients
        self._address = client_address(environ)
        self._clients.add(self._address)
        self._counted = True

    def close(self) -> None:
        """Called by the WSGI server when the response is done (PEP 3333), however it ended."""
        if self._counted:
            self._counted = False
            self._clients.remove(self._address)

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._answer()
        finally:
            self.close()

    def _answer(self) -> Iterator[bytes]:
        park = self.park
        while True:
            changed = False
            remaining = min(park.deadline, park.recheck) - time.monotonic()
            if remaining > 0 and not self.feed.draining:
                self.client, changed = wait_for_change(
                    self.feed, park.watch, park.pos, remaining, self.client
                )
            pos = self.feed.position()
            # Stopping (feed.drain) counts as the deadline: answer with what there is.
            woken = time.monotonic() < park.deadline and not self.feed.draining
            answer: Rendered | None = None
            if woken and not changed:
                # The recheck time came (a leaf fell due for renewal), not a write: nothing
                # the others woken by writes rendered can say whether this result is stale.
                answer = self._rerun(replace(park, timed=True))
            elif woken:
                # Share the rendering with the queries woken with this one: the first runs the
                # view (``mine``), the others take what it rendered if it fits them.
                mine: list[Rendered] = []

                def run_mine(park: Park = park, mine: list[Rendered] = mine) -> Rendered:
                    mine.append(self._rerun(park))
                    return mine[0]

                got = self.shared.read(("rendered", park.key), pos, run_mine)
                if mine:
                    answer = got
                elif got.shareable and park.since.is_new(got.version):
                    answer = got
                elif not got.status and not park.since.is_new(got.version):
                    # The change gave this read nothing new for the client: wait on.
                    park = replace(park, pos=pos, seen=got.version)
                    continue
            if answer is None:
                # At the deadline, or what the others rendered does not fit this query.
                answer = self._rerun(park)
            if answer.status:
                yield self._send(answer, woken=woken)
                return
            park = self._last_park

    # -- helpers ---------------------------------------------------------------------------------

    def _rerun(self, park: Park) -> Rendered:
        """Run the view again on this request. Returns the rendered answer, or (status "")
        the version it saw when the query must go on waiting (then ``_last_park``)."""
        environ = self.environ
        environ[RERUN] = park
        try:
            with self.app.request_context(environ):
                rv = self.app.full_dispatch_request()
        finally:
            environ.pop(RERUN, None)
        if isinstance(rv, ParkedResponse):
            self._last_park = rv.park
            return Rendered(version=rv.park.seen)
        app_iter, status, headers = rv.get_wsgi_response(environ)
        try:
            body = b"".join(app_iter)
        finally:
            close = getattr(app_iter, "close", None)
            if close is not None:
                close()
        return Rendered(
            version=rv.headers.get(park.since.header, ""),
            status=status,
            headers=tuple(headers),
            body=body,
            shareable=rv.status_code in SHAREABLE,
        )

    def _send(self, answer: Rendered, *, woken: bool) -> bytes:
        sock = self.environ.get("gunicorn.socket")
        if woken and hasattr(sock, "woken"):
            sock.woken = True  # see api.gworker: let the rest of the batch answer first
        self.start_response(answer.status, list(answer.headers))
        return answer.body


def client_socket(environ: dict) -> Any:
    """The client connection when Trellis's gevent worker (``trellis.api.gworker``) serves the
    request, which lets a parked query watch it; None under other servers and in tests."""
    sock = environ.get("gunicorn.socket")
    return sock if hasattr(sock, "on_readable") else None


def wait_for_change(
    feed: ChangeFeed, watch: Watch, pos: int, timeout: float, client: Any
) -> tuple[Any, bool]:
    """``feed.wait``, also woken when the client's socket (if any) turns readable. Returns the
    client to watch from now on and whether anything woke it before ``timeout``.

    If the client closed, end the query now instead of holding a connection slot until
    ``wait`` runs out (up to 10 minutes): raise ``ClientGone``, which the WSGI server treats as
    a connection gone. If it sent more (a pipelined request), stop watching, since
    those bytes stay readable until gunicorn reads them after this answer: the client to watch
    is None from then on.
    """
    if client is None:
        return None, feed.wait(watch, pos, timeout)
    event = threading.Event()
    fired: list[bool] = []

    def readable() -> None:
        fired.append(True)
        event.set()

    stop = client.on_readable(readable)
    try:
        changed = feed.wait(watch, pos, timeout, event)
    finally:
        stop()
    if not fired:
        return client, changed
    if client.peer_closed():
        raise ClientGone()
    return None, True
