"""A small HTTP/1.1 server on trio and h11 for the agent's local API.

One task per connection, keep-alive, one request at a time. A request's body is read whole
(bounded by ``max_body``: 413 beyond it); a response is either bytes or a stream (a forwarded
answer, passed on as it arrives). While a handler runs, the connection is watched: a client
that goes away cancels the handler, so a forwarded blocking query stops waiting on the server
too. Every failure a client can cause is a 4xx with the server's error shape
(``{"error","code","status"}``); a bug of ours is a 500 with that shape and a log line, never
a traceback on the wire.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from trellis.api.errors import BadRequest, PayloadTooLarge, TrellisError

log = logging.getLogger("trellis.agent")

MAX_HEAD = 32 * 1024
IDLE_TIMEOUT = 120.0
BODY_TIMEOUT = 30.0
#: Requests whose body may exceed ``max_body``, and their own limit: a snapshot restore
#: carries the whole store, forwarded to a server that checks it (trellis.api.snapshot's
#: MAX_ARCHIVE_BYTES, which this matches).
LARGE_BODIES = {("PUT", "/v1/snapshot"): 512 * 1024 * 1024}


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def arg(self, name: str) -> str | None:
        v = self.query.get(name)
        return v[-1] if v else None

    def has(self, name: str) -> bool:
        return name in self.query

    def token(self) -> str:
        """The caller's ACL token: ``X-Consul-Token``, ``Authorization: Bearer``, ``?token``."""
        t = self.header("x-consul-token")
        if t:
            return t
        auth = self.header("authorization") or ""
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return auth[7:].strip()
        # Lowest priority, as in Consul (and as the servers read it: trellis.api.acl.service).
        return (self.arg("token") or "").strip()

    def json(self) -> Any:
        if not self.body.strip():
            raise BadRequest("a JSON body is required")
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    #: The length of ``stream`` when it is known (a forwarded answer's Content-Length): sent
    #: as such, so a client sees the server's framing; else the stream is sent chunked.
    length: int | None = None
    #: Called when the response is done or abandoned (closes a forwarded exchange).
    close: Callable[[], Awaitable[None]] | None = None


def json_response(
    value: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    body = json.dumps(value).encode()
    return Response(
        status,
        [(b"content-type", b"application/json"), *(headers or [])],
        body,
    )


def error_response(e: TrellisError) -> Response:
    extra = [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    return json_response(e.to_json(), e.status, extra)


Handler = Callable[[Request], Awaitable[Response]]


def parse_target(target: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(target)
    return unquote(parts.path), parse_qs(parts.query, keep_blank_values=True)


class _ClientGone(Exception):
    pass


async def serve_connection(
    stream: trio.SocketStream, handler: Handler, *, max_body: int = 4 * 1024 * 1024
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        while True:
            try:
                req = await _read_request(stream, conn, max_body)
            except TrellisError as e:
                await _send(stream, conn, error_response(e))
                return
            if req is None:
                return
            resp = await _handle(stream, conn, handler, req)
            if resp is None:
                return  # the client went away
            ok = await _send(stream, conn, resp)
            if not ok or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            try:
                conn.start_next_cycle()
            except h11.ProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
        return  # the client or the server went away mid-answer: close this connection
    except Exception:
        # A bug of ours: this connection ends, the agent keeps serving the others.
        log.exception("the agent's HTTP connection failed")
        return
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _next_event(stream: trio.SocketStream, conn: h11.Connection, timeout: float) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(timeout) as scope:
            data = await stream.receive_some(65536)
        if scope.cancelled_caught:
            return h11.ConnectionClosed()
        conn.receive_data(data)


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection, max_body: int
) -> Request | None:
    try:
        event = await _next_event(stream, conn, IDLE_TIMEOUT)
    except h11.RemoteProtocolError as e:
        raise BadRequest(f"malformed request: {e}") from None
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        return None
    method = event.method.decode("ascii", "replace")
    target = event.target.decode("latin-1")
    headers = [(bytes(k).lower(), bytes(v)) for k, v in event.headers]
    max_body = max(max_body, LARGE_BODIES.get((method, target.split("?", 1)[0]), 0))
    for k, v in headers:
        if k == b"content-length" and v.isdigit() and int(v) > max_body:
            raise PayloadTooLarge(f"the request body is larger than {max_body} bytes")
    body = bytearray()
    while True:
        try:
            ev = await _next_event(stream, conn, BODY_TIMEOUT)
        except h11.RemoteProtocolError as e:
            raise BadRequest(f"malformed request: {e}") from None
        if isinstance(ev, h11.Data):
            body += ev.data
            if len(body) > max_body:
                raise PayloadTooLarge(f"the request body is larger than {max_body} bytes")
        elif isinstance(ev, h11.EndOfMessage):
            break
        else:
            return None
    path, query = parse_target(target)
    return Request(method, target, path, query, headers, bytes(body))


async def _handle(
    stream: trio.SocketStream, conn: h11.Connection, handler: Handler, req: Request
) -> Response | None:
    """Run the handler while watching the client: None if it went away meanwhile."""
    result: list[Response] = []
    gone = False

    async def watch(cancel: trio.CancelScope) -> None:
        nonlocal gone
        data = await stream.receive_some(65536)
        if not data:
            gone = True
            cancel.cancel()
        else:
            # A pipelined request: keep its bytes for the next cycle; stop watching.
            conn.receive_data(data)

    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope

        async def run() -> None:
            try:
                result.append(await handler(req))
            except TrellisError as e:
                result.append(error_response(e))
            except Exception:
                log.exception("the agent failed on %s %s", req.method, req.path)
                result.append(
                    error_response(TrellisError("internal error in the agent (see its log)"))
                )
            scope.cancel()

        nursery.start_soon(watch, scope)
        nursery.start_soon(run)
    if gone or not result:
        if result and result[0].close is not None:
            await result[0].close()
        return None
    return result[0]


async def _send(stream: trio.SocketStream, conn: h11.Connection, resp: Response) -> bool:
    try:
        headers = [(k, v) for k, v in resp.headers if k not in (b"content-length",)]
        if resp.stream is None:
            headers.append((b"content-length", str(len(resp.body)).encode()))
            data = conn.send(h11.Response(status_code=resp.status, headers=headers))
            if resp.body:
                data += conn.send(h11.Data(data=resp.body))
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            return True
        if resp.length is not None:
            headers.append((b"content-length", str(resp.length).encode()))
        else:
            headers.append((b"transfer-encoding", b"chunked"))
        await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
        async for chunk in resp.stream:
            if chunk:
                await stream.send_all(conn.send(h11.Data(data=chunk)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True
    except h11.LocalProtocolError:
        return False
    finally:
        if resp.close is not None:
            await resp.close()


async def serve(listener: trio.SocketListener, handler: Handler, *, max_body: int) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(lambda s=stream: serve_connection(s, handler, max_body=max_body))
