"""The agent's way to the servers: HTTP/1.1 over trio, with failover across the ``-server``
addresses, and keep-alive connections for reads.

Theory of operation. The agent talks to one server at a time (``current``). A request that
cannot reach it (connection refused, a timeout before the answer starts) or that it answers
with a 5xx moves ``current`` to the next address and is tried there, once per address; the
agent's own writes are idempotent (catalog registrations), and a forwarded request is
retried on a 5xx only when it is a read, so a client's write is never applied twice.
A forwarded write that went out and then failed is not sent again (the server may have
applied it): the client gets a 503 and decides. ``on_recovered`` is called when a request
succeeds after one failed: the server may have come back empty, so the caller runs a full
anti-entropy sync.

Responses are streamed (``Exchange.body``): a forwarded blocking query hands the server's
bytes to the client as they come, and cancelling the caller's scope closes the connection to
the server, which ends the server's wait too.

Keep-alive. A new TCP connection per request cost about 1.1 ms of every request through the
agent. Reads (GET, HEAD) now go over a kept connection when one is idle (``_Pool``): a
connection goes back to the pool only when its exchange ended cleanly (the whole body read,
and the server did not ask to close), and it is dropped after ``POOL_IDLE`` seconds unused,
well under the server's own idle timeout. A kept connection may still have been closed by
the server (its idle timeout, a restart): a read that fails on one before any byte of the
answer arrived is sent again on a new connection, which is safe for a read. Writes keep
opening a connection each: sent again after such a failure, a write could be applied twice
(the server may have read it before it went away), and told apart from a stale connection it
cannot be.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from trellis.proxy.client import normalize_address

log = logging.getLogger("trellis.agent")

#: Headers that belong to one hop, never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
CONNECT_TIMEOUT = 5.0
MAX_RESPONSE_HEAD = 64 * 1024
#: Seconds a kept connection may stay unused; the server's idle timeout is 75 s by default.
POOL_IDLE = 15.0
#: Idle kept connections per server address at the most (each holds a server slot).
POOL_SIZE = 16
#: The methods that may use a kept connection (see the module docstring).
REUSABLE = frozenset({"GET", "HEAD"})


class Unreachable(Exception):
    """No server answered (every address refused, timed out or failed with a 5xx)."""


class _AfterSend(Exception):
    """The request went out, then the answer failed: the server may have applied it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")


@dataclass
class Exchange:
    """A server's answer whose body is still to be read (``body``); ``close`` when done."""

    status: int
    headers: list[tuple[bytes, bytes]]
    server: str
    _stream: trio.abc.Stream
    _conn: h11.Connection
    #: Where the connection goes when the exchange ends cleanly; None: it is closed.
    _pool: _Pool | None = None

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._stream.receive_some(65536)
                self._conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def read(self, limit: int = 64 * 1024 * 1024) -> bytes:
        out = bytearray()
        async for chunk in self.body():
            out += chunk
            if len(out) > limit:
                raise h11.RemoteProtocolError("response too large")
        return bytes(out)

    async def close(self) -> None:
        conn, pool = self._conn, self._pool
        self._pool = None  # a second close must not put the connection back twice
        if pool is not None and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            if pool.put(self.server, self._stream, conn):
                return
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    def header(self, name: bytes) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v.decode("latin-1")
        return None


class _Pool:
    """Idle kept connections by server address, the most recently used first. It closes
    nothing itself: what it gives back to close (``put``, ``take``, ``clear``), the caller
    closes, in trio."""

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[float, trio.abc.Stream, h11.Connection]]] = {}
        self._dropped: list[trio.abc.Stream] = []  # to close at the next take() or clear()

    def drop(self, address: str) -> None:
        """Forget the kept connections to ``address`` (it failed: a connection kept from
        before may reach a server process that is going away, whose answer would hide the
        failure)."""
        self._dropped += [stream for _, stream, _ in self._idle.pop(address, ())]

    def put(self, address: str, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """Keep the connection; False when the pool is full (the caller closes it)."""
        idle = self._idle.setdefault(address, [])
        if len(idle) >= POOL_SIZE:
            return False
        idle.append((trio.current_time(), stream, conn))
        return True

    def take(
        self, address: str
    ) -> tuple[tuple[trio.abc.Stream, h11.Connection] | None, list[trio.abc.Stream]]:
        """A kept connection young enough to use, if any, and the expired ones to close."""
        idle = self._idle.get(address)
        now = trio.current_time()
        expired, self._dropped = self._dropped, []
        while idle:
            since, stream, conn = idle.pop()
            if now - since < POOL_IDLE:
                return (stream, conn), expired
            expired.append(stream)
        return None, expired

    def clear(self) -> list[trio.abc.Stream]:
        out = [stream for idle in self._idle.values() for _, stream, _ in idle]
        out += self._dropped
        self._idle.clear()
        self._dropped = []
        return out


async def _close_all(streams: list[trio.abc.Stream]) -> None:
    with trio.CancelScope(shield=True):
        for stream in streams:
            await stream.aclose()


class _Stale(Exception):
    """A kept connection failed before any byte of the answer: the server had closed it."""


class Servers:
    """The ``-server`` addresses, the one in use, and requests to them."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        ca_file: str | None = None,
        on_recovered: Callable[[], None] = lambda: None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one server address is needed")
        self.addresses = [normalize_address(a) for a in addresses]
        self.current = 0
        self.failing = False
        self.on_recovered = on_recovered
        self._ssl: ssl.SSLContext | None = None
        if any(a.startswith("https://") for a in self.addresses):
            self._ssl = ssl.create_default_context(cafile=ca_file)
        self._pool = _Pool()

    async def aclose(self) -> None:
        """Close the kept connections (the agent is stopping)."""
        await _close_all(self._pool.clear())

    @property
    def address(self) -> str:
        return self.addresses[self.current]

    def _failed(self, address: str, why: str) -> None:
        self._pool.drop(address)
        if not self.failing:
            log.warning("server %s failed (%s); trying the next", address, why)
        self.failing = True
        if self.addresses[self.current] == address:
            self.current = (self.current + 1) % len(self.addresses)

    def _succeeded(self) -> None:
        if self.failing:
            self.failing = False
            log.info("server %s is answering again", self.address)
            self.on_recovered()

    async def _open(self, address: str) -> trio.abc.Stream:
        parts = urlsplit(address)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with trio.fail_after(CONNECT_TIMEOUT):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if parts.scheme == "https":
                assert self._ssl is not None
                tls = trio.SSLStream(stream, self._ssl, server_hostname=host)
                await tls.do_handshake()
                stream = tls
        return stream

    async def _once(
        self,
        address: str,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        head_timeout: float,
    ) -> Exchange:
        reuse = method in REUSABLE
        kept = None
        if reuse:
            kept, expired = self._pool.take(address)
            await _close_all(expired)
        if kept is not None:
            try:
                return await self._exchange(
                    address, *kept, method, target, headers, body, head_timeout, kept=True
                )
            except _Stale:
                pass  # the server had closed it: a new connection below
        stream = await self._open(address)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        return await self._exchange(
            address, stream, conn, method, target, headers, body, head_timeout, kept=False
        )

    async def _exchange(
        self,
        address: str,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        head_timeout: float,
        *,
        kept: bool,
    ) -> Exchange:
        """Send the request on ``stream`` and read the answer's head. On a ``kept``
        connection, a failure before any byte of the answer raises _Stale."""
        reuse = method in REUSABLE
        host = urlsplit(address).netloc.encode()
        try:
            out = [(b"host", host), *headers, (b"content-length", str(len(body)).encode())]
            if not reuse:
                out.append((b"connection", b"close"))
            data = conn.send(h11.Request(method=method, target=target, headers=out))
            data += conn.send(h11.Data(data=body)) if body else b""
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if kept:
                raise _Stale from None
            raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        got = False
        try:
            with trio.fail_after(head_timeout):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        chunk = await stream.receive_some(65536)
                        got = got or bool(chunk)
                        conn.receive_data(chunk)
                        continue
                    if isinstance(event, h11.InformationalResponse):
                        continue
                    if isinstance(event, h11.Response):
                        return Exchange(
                            event.status_code,
                            list(event.headers),
                            address,
                            stream,
                            conn,
                            self._pool if reuse else None,
                        )
                    raise h11.RemoteProtocolError("the server closed the connection")
        except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as e:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if kept and not got and not isinstance(e, trio.TooSlowError):
                raise _Stale from None
            raise _AfterSend(e) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def open(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        head_timeout: float = 30.0,
        retry_5xx: bool = True,
    ) -> Exchange:
        """Send the request to the current server, else the next ones; the first answer that
        is not a failure (see the module docstring). Raises Unreachable."""
        last = "no server"
        for _ in range(len(self.addresses)):
            address = self.address
            try:
                ex = await self._once(address, method, target, list(headers), body, head_timeout)
            except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as e:
                last = f"{address}: {type(e).__name__}: {e}"
                self._failed(address, last)
                continue
            except _AfterSend as e:
                last = f"{address}: {e}"
                self._failed(address, last)
                if not retry_5xx:
                    # A client's write that reached the server: sending it again elsewhere
                    # could apply it twice. The client decides whether to retry.
                    raise Unreachable(last) from None
                continue
            if ex.status >= 500 and retry_5xx and len(self.addresses) > 1:
                await ex.close()
                last = f"{address}: HTTP {ex.status}"
                self._failed(address, last)
                continue
            if ex.status < 500:
                self._succeeded()
            return ex
        raise Unreachable(last)

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str = "",
        json_body: Any = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any, Exchange | None]:
        """A whole request of the agent's own: ``(status, decoded JSON or text, exchange)``.
        Raises Unreachable."""
        headers: list[tuple[bytes, bytes]] = []
        if token:
            headers.append((b"x-consul-token", token.encode()))
        body = b""
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.append((b"content-type", b"application/json"))
        ex = await self.open(method, path, headers=headers, body=body, head_timeout=timeout)
        try:
            with trio.fail_after(timeout):
                raw = await ex.read()
        except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as e:
            self._failed(ex.server, str(e))
            raise Unreachable(f"{ex.server}: {e}") from None
        finally:
            await ex.close()
        if ex.status >= 500:
            self._failed(ex.server, f"HTTP {ex.status}")
            raise Unreachable(f"{ex.server}: HTTP {ex.status}: {raw[:200]!r}")
        try:
            value: Any = json.loads(raw) if raw else None
        except ValueError:
            value = raw.decode("utf-8", "replace")
        return ex.status, value, ex
