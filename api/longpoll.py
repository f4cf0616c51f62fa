"""Parking blocking queries outside the view, and answering a woken batch with one rendering.

A blocking query (``trellis.api.http.blocking``) that has nothing new to return does not wait inside
its view. It raises ``Park``; the app turns that into a ``ParkedResponse``, and Flask finishes
the request as usual (after-request hooks, context teardown). The WSGI server then iterates the
response, and the iteration is where the query waits on the change feed:

1. When a change wakes it (or ``wait`` runs out), it runs the view again, in a fresh request
   context on the same environ, marked as a re-run (``RERUN``). ``blocking`` then reads through
   the shared reads instead of the store, and either returns the new result (the view renders
   it; the response is sent) or raises ``Park`` again (the change did not move the index past
   the client's: wait on).
2. One write can wake a thousand queries for the same read (path, arguments, token). The first
   to run renders the response; the others woken with it take the rendered bytes from the same
   single-flight table and send them, without running the view, Flask's request handling or
   JSON encoding again. That is what keeps a thousand wake-ups within a hundred milliseconds on
   two cores.

A query whose client closes the connection while parked ends at once (see
``wait_for_change``); to the WSGI server it looks like a connection reset.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response

from trellis.api.feed import ChangeFeed, SharedReads, Watch

#: Environ key: the ``Park`` of the query being re-run after a wake-up or at its deadline.
RERUN = "trellis.longpoll"

#: Statuses whose rendering a woken batch may share: the answers a read gives. Anything else
#: (a 403 after a token was deleted, a 503) is rendered by each query for itself.
SHAREABLE = frozenset({200, 404})


@dataclass
class Park:
    """Why and until when a blocking query waits."""

    watch: Watch
    pos: int  # the feed position its last result covers
    deadline: float  # time.monotonic() at which it answers with what it has
    key: tuple  # what identifies its read (path, arguments, token), see api.http._read_key
    min_index: int  # the client's ?index
    index: int  # the index of its last result (not above min_index, or it would not wait)


class Parked(Exception):
    """Raised by ``trellis.api.http.blocking`` to park the query outside the view."""

    def __init__(self, park: Park) -> None:
        super().__init__("parked")
        self.park = park


class ClientGone(ConnectionResetError):
    """The client closed its connection while its query waited. Outside a view (a parked
    query's iterable) gunicorn takes it as a reset connection and closes it quietly; inside a
    view (an agent ``?hash=`` wait) the app turns it into ``_Reset``, which does the same."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNRESET, "the client closed the connection")


class _Reset(Response):
    """The answer to a client that is gone: nothing is sent, the connection is dropped."""

    def __call__(self, environ: dict, start_response: Any) -> Any:  # type: ignore[override]
        return _ResetIter()


class _ResetIter:
    def __iter__(self) -> Iterator[bytes]:
        raise ClientGone()


@dataclass(frozen=True)
class Rendered:
    """What a woken query's view answered, for the others woken with it."""

    index: int
    status: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    shareable: bool = False  # False: re-run the view (an error, or parked again)


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

    @app.errorhandler(ClientGone)
    def _gone(e: ClientGone) -> Response:
        return _Reset()


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

    def __iter__(self) -> Iterator[bytes]:
        park = self.park
        while True:
            remaining = park.deadline - time.monotonic()
            if remaining > 0 and not self.feed.draining:
                self.client = wait_for_change(
                    self.feed, park.watch, park.pos, remaining, self.client
                )
            pos = self.feed.position()
            # Stopping (feed.drain) counts as the deadline: answer with what there is.
            woken = time.monotonic() < park.deadline and not self.feed.draining
            answer: Rendered | None = None
            if woken:
                # Share the rendering with the queries woken with this one: the first runs the
                # view (``mine``), the others take what it rendered if it fits them.
                mine: list[Rendered] = []

                def run_mine(park: Park = park, mine: list[Rendered] = mine) -> Rendered:
                    mine.append(self._rerun(park))
                    return mine[0]

                got = self.shared.read(("rendered", park.key), pos, run_mine)
                if mine:
                    answer = got
                elif got.shareable and got.index > park.min_index:
                    answer = got
                elif not got.status and got.index <= park.min_index:
                    # The change did not move this read past the client's index: wait on.
                    park = Park(park.watch, pos, park.deadline, park.key, park.min_index, got.index)
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
        the index it saw when the query must go on waiting (then ``_last_park``)."""
        environ = self.environ
        environ[RERUN] = park
        try:
            with self.app.request_context(environ):
                rv = self.app.full_dispatch_request()
        finally:
            environ.pop(RERUN, None)
        if isinstance(rv, ParkedResponse):
            self._last_park = rv.park
            return Rendered(index=rv.park.index)
        app_iter, status, headers = rv.get_wsgi_response(environ)
        try:
            body = b"".join(app_iter)
        finally:
            close = getattr(app_iter, "close", None)
            if close is not None:
                close()
        index = int(rv.headers.get("X-Consul-Index", "0") or 0)
        return Rendered(
            index=index,
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


def wait_for_change(feed: ChangeFeed, watch: Watch, pos: int, timeout: float, client: Any) -> Any:
    """``feed.wait``, also woken when the client's socket (if any) turns readable.

    If the client closed, end the query now instead of holding a connection slot until
    ``wait`` runs out (up to 10 minutes): raise ``ClientGone``, which the WSGI server treats as
    a connection gone. If it sent more (a pipelined request), stop watching, since
    those bytes stay readable until gunicorn reads them after this answer: return None, the
    client to watch from now on.
    """
    if client is None:
        feed.wait(watch, pos, timeout)
        return None
    event = threading.Event()
    fired: list[bool] = []

    def readable() -> None:
        fired.append(True)
        event.set()

    stop = client.on_readable(readable)
    try:
        feed.wait(watch, pos, timeout, event)
    finally:
        stop()
    if not fired:
        return client
    if client.peer_closed():
        raise ClientGone()
    return None
