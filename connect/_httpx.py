"""``Service.httpx_transport()``: ``httpx`` over Connect.

Theory of operation
-------------------
An httpx transport turns a request into a response; httpcore's connection pools do the
HTTP/1.1 part (keep-alive, request and response bodies) over whatever network backend they are
given. The transport here is one httpcore pool per flavour (sync, async) whose backend opens a
connection with ``Service.connect`` (``connect_async`` under asyncio, ``connect_trio`` under
trio): the URL's host is the destination *service* (``http://db/path``: instance choice,
failover, mutual TLS and the whole SPIFFE ID check are ``connect``'s), and its port is ignored
(the catalog says where each instance listens). The scheme is ``http``: TLS is Connect's own, a
second layer would have no certificate to check. Keep-alive connections are pooled per service
name, as httpcore pools per origin.

httpcore's exceptions become httpx's, as ``httpx.HTTPTransport`` does; a destination that no
instance serves is an ``httpx.ConnectError`` whose message is ``ConnectError``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import httpcore
import httpx
import sniffio
import trio

from trellis.connect._state import ConnectError

if TYPE_CHECKING:
    from trellis.connect._service import Service

_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _as_httpx(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        for theirs, ours in _ERRORS:
            if isinstance(e, theirs):
                raise ours(str(e), request=request) from e
        raise


def _dialled(fn: Any) -> Any:
    """Run a dial, turning the SDK's errors into httpcore's (the pool knows those)."""
    try:
        return fn()
    except TimeoutError as e:
        raise httpcore.ConnectTimeout(str(e)) from e
    except (ConnectError, OSError) as e:
        raise httpcore.ConnectError(str(e)) from e


# -- sync ---------------------------------------------------------------------------------


class _SocketStream(httpcore.NetworkStream):
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._sock.settimeout(timeout)
        try:
            return self._sock.recv(max_bytes)
        except TimeoutError as e:
            raise httpcore.ReadTimeout(str(e)) from e
        except OSError as e:
            raise httpcore.ReadError(str(e)) from e

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(buffer)
        except TimeoutError as e:
            raise httpcore.WriteTimeout(str(e)) from e
        except OSError as e:
            raise httpcore.WriteError(str(e)) from e

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        return self._sock if info == "socket" else None


class _SyncBackend(httpcore.NetworkBackend):
    def __init__(self, svc: Service) -> None:
        self._svc = svc

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _SocketStream(_dialled(lambda: self._svc.connect(host, timeout=timeout)))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx(self._request):
            yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


# -- async --------------------------------------------------------------------------------


class _AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as e:
            raise httpcore.ReadTimeout("read timed out") from e
        except OSError as e:
            raise httpcore.ReadError(str(e)) from e

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError as e:
            raise httpcore.WriteTimeout("write timed out") from e
        except OSError as e:
            raise httpcore.WriteError(str(e)) from e

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()

    def get_extra_info(self, info: str) -> Any:
        return self._writer.get_extra_info("socket") if info == "socket" else None


class _TrioStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                return bytes(await self._stream.receive_some(max_bytes))
        except trio.TooSlowError as e:
            raise httpcore.ReadTimeout("read timed out") from e
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpcore.ReadError(str(e)) from e

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                await self._stream.send_all(buffer)
        except trio.TooSlowError as e:
            raise httpcore.WriteTimeout("write timed out") from e
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpcore.WriteError(str(e)) from e

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    def get_extra_info(self, info: str) -> Any:
        return None


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, svc: Service) -> None:
        self._svc = svc

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            if sniffio.current_async_library() == "trio":
                return _TrioStream(await self._svc.connect_trio(host, timeout=timeout))
            return _AsyncioStream(*await self._svc.connect_async(host, timeout=timeout))
        except TimeoutError as e:
            raise httpcore.ConnectTimeout(str(e)) from e
        except (ConnectError, OSError) as e:
            raise httpcore.ConnectError(str(e)) from e

    async def sleep(self, seconds: float) -> None:
        if sniffio.current_async_library() == "trio":
            await trio.sleep(seconds)
        else:
            await asyncio.sleep(seconds)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, response: httpcore.Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(self._request):
            async for chunk in self._response.aiter_stream():
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


# -- the transport ------------------------------------------------------------------------


def _core_request(request: httpx.Request) -> httpcore.Request:
    if request.url.scheme != "http":
        raise httpx.UnsupportedProtocol(
            f"over Connect, call http://<service>/... (TLS is Connect's), not {request.url}",
            request=request,
        )
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=b"http",
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )


class Transport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """An httpx transport (for ``httpx.Client`` and ``httpx.AsyncClient`` alike) whose
    requests to ``http://<service>/...`` go over Connect; see ``Service.httpx_transport``."""

    def __init__(self, svc: Service, *, max_connections: int = 10) -> None:
        self._sync = httpcore.ConnectionPool(
            network_backend=_SyncBackend(svc), max_connections=max_connections
        )
        self._async = httpcore.AsyncConnectionPool(
            network_backend=_AsyncBackend(svc), max_connections=max_connections
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core = _core_request(request)
        with _as_httpx(request):
            resp = self._sync.handle_request(core)
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_SyncBody(resp, request),
            extensions=resp.extensions,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = _core_request(request)
        with _as_httpx(request):
            resp = await self._async.handle_async_request(core)
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_AsyncBody(resp, request),
            extensions=resp.extensions,
        )

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        await self._async.aclose()
