"""A small raw HTTP/1.1 keep-alive client for the benchmarks (asyncio), shared by
``control_plane.py`` and ``ca.py``: pre-encoded requests, responses read as status line,
headers and a Content-Length or chunked body, so the load generator stays cheap next to the
server it measures."""

from __future__ import annotations

import asyncio
import math
import re
import time


class Resp:
    __slots__ = ("body", "index", "status", "t")

    def __init__(self, status: int, index: int, body: bytes, t: float) -> None:
        self.status = status
        self.index = index
        self.body = body
        self.t = t


class Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Resp] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(ConnectionError(f"connection closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while self.waiter is not None:
            hend = buf.find(b"\r\n\r\n")
            if hend < 0:
                return
            lines = bytes(buf[:hend]).split(b"\r\n")
            status = int(lines[0][9:12])
            clen = 0
            index = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.lower()
                if name == b"content-length":
                    clen = int(value)
                elif name == b"x-consul-index":
                    index = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            start = hend + 4
            if chunked:
                got = _dechunk(buf, start)
                if got is None:
                    return
                body, end = got
            else:
                end = start + clen
                if len(buf) < end:
                    return
                body = bytes(buf[start:end])
            del buf[:end]
            w, self.waiter = self.waiter, None
            if not w.done():
                w.set_result(Resp(status, index, body, time.perf_counter()))

    def request(self, data: bytes) -> asyncio.Future[Resp]:
        fut: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            fut.set_exception(ConnectionError("connection closed"))
            return fut
        self.waiter = fut
        self.transport.write(data)
        return fut

    def close(self) -> None:
        # A request still in flight (a parked blocking query) is cancelled, not failed.
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.cancel()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # no trailers are expected
            return (bytes(out), end + 2) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


def hostport(url: str) -> tuple[str, int]:
    m = re.match(r"http://([^:/]+):(\d+)", url)
    if not m:
        raise ValueError(f"not an http://host:port URL: {url}")
    return m.group(1), int(m.group(2))


async def connect(url: str, n: int, parallel: int = 200) -> list[Conn]:
    host, port = hostport(url)
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)

    async def one() -> Conn:
        async with sem:
            _, proto = await loop.create_connection(Conn, host, port)
            return proto

    return list(await asyncio.gather(*(one() for _ in range(n))))


def close_all(conns: list[Conn]) -> None:
    for c in conns:
        c.close()


def pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    i = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)
