"""The HTTP server under a slow or greedy client (a real ``trellis server``, gevent worker).

Issue 9, item 2: connections that send their headers with ``Content-Length: 100`` and then a
few bytes of body were never closed, and a few thousand of them took every connection slot of
a worker, so normal requests timed out for as long as the attacker cared to hold them. The
server now cuts a stalled body (``limits.http_body_timeout``, a 408), a stalled or missing
request head (``limits.http_header_timeout``), and admits at most
``limits.http_max_conns_per_client`` connections per client address per worker (a 429 beyond).

Everything runs on loopback. Linux routes the whole of 127.0.0.0/8 to lo, so the attackers
connect from 127.0.0.2 while normal clients come from 127.0.0.1: two client addresses, as two
hosts would be.
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest

from tests.support import TrellisProcess, server_args, wait_until

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"


def start_server(tmp_path: Path, **config: object) -> TrellisProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    args = [*server_args(tmp_path / "data", workers=1, node="n1"), "-config", str(path)]
    return TrellisProcess(args).start()


def hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def open_from(source: str, url: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(hostport(url))
    except OSError:
        s.close()
        raise
    return s


def stalled_body(host: str) -> bytes:
    """A request head that promises 100 bytes of body, and 3 of them."""
    return (f"PUT /v1/kv/slow HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\nabc").encode()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``timeout``)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, f"RLIMIT_NOFILE hard {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def latencies(url: str, n: int) -> list[float]:
    """``n`` requests from 127.0.0.1, each on a new connection (as a new client would)."""
    out = []
    transport = httpx.HTTPTransport(local_address="127.0.0.1")
    with httpx.Client(transport=transport, timeout=5.0) as c:
        for _ in range(n):
            t = time.monotonic()
            r = c.get(url + "/v1/status/leader", headers={"Connection": "close"})
            assert r.status_code == 200
            out.append(time.monotonic() - t)
    return out


def test_thousands_of_stalled_bodies_leave_normal_requests_served(tmp_path):
    """3,000 connections from one address stall in their bodies; the worker has 1,024 slots.
    Before the fix they took every slot for good and the normal requests timed out."""
    attackers = 3000
    raise_nofile(attackers + 1024)
    srv = start_server(tmp_path, server={"worker_connections": 1024})
    held: list[socket.socket] = []
    try:
        host = srv.url.removeprefix("http://")
        baseline = latencies(srv.url, 20)
        for _ in range(attackers):
            try:
                s = open_from(ATTACKER, srv.url, timeout=1.0)
            except OSError:
                continue  # the backlog is full: the attacker just tries the next
            held.append(s)
            try:
                s.sendall(stalled_body(host))
            except OSError:
                pass  # refused (429 and closed) already
        assert len(held) > 1024, "the attack did not get going"
        under_attack = latencies(srv.url, 30)
        p50, worst = statistics.median(under_attack), max(under_attack)
        assert p50 < max(0.25, 10 * statistics.median(baseline)), (p50, baseline)
        assert worst < 2.0, under_attack
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_a_stalled_body_is_answered_408_and_closed(tmp_path):
    srv = start_server(tmp_path, limits={"http_body_timeout": "1s"})
    try:
        host = srv.url.removeprefix("http://")
        s = open_from("127.0.0.1", srv.url)
        started = time.monotonic()
        s.sendall(stalled_body(host))
        raw = read_until_closed(s, timeout=10)
        elapsed = time.monotonic() - started
        s.close()
        status, body = status_and_body(raw)
        assert status == 408 and body["code"] == "request_timeout", raw
        assert b"connection: close" in raw.lower()
        assert 0.9 < elapsed < 5, elapsed
        # Nothing was written: the K/V PUT never ran.
        assert httpx.get(srv.url + "/v1/kv/slow").status_code == 404
    finally:
        srv.stop()


def test_a_stalled_head_is_cut_after_the_header_timeout(tmp_path):
    srv = start_server(tmp_path, limits={"http_header_timeout": "1s"})
    try:
        silent = open_from("127.0.0.1", srv.url)  # sends nothing at all
        partial = open_from("127.0.0.1", srv.url)
        started = time.monotonic()
        partial.sendall(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n")  # no blank line
        assert read_until_closed(silent, timeout=10) == b""
        assert read_until_closed(partial, timeout=10) == b""
        assert time.monotonic() - started < 5
        silent.close()
        partial.close()
        # A keep-alive connection between requests is idle, not slow: it is not cut after
        # the header timeout, and its next request is served.
        with httpx.Client(timeout=5) as c:
            assert c.get(srv.url + "/v1/status/leader").status_code == 200
            time.sleep(1.5)  # the scenario, not a wait for something: idle past the timeout
            r = c.get(srv.url + "/v1/status/leader")
            assert r.status_code == 200
            assert c.get(srv.url + "/v1/agent/self").status_code == 200
    finally:
        srv.stop()


def test_connections_over_the_per_client_cap_get_429(tmp_path):
    srv = start_server(
        tmp_path, limits={"http_max_conns_per_client": 5, "http_header_timeout": "60s"}
    )
    held: list[socket.socket] = []
    try:
        for _ in range(5):
            held.append(open_from(ATTACKER, srv.url))
        # The server counts a connection once it has accepted it; a request on each proves
        # they all were.
        for s in held:
            s.sendall(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        extra = open_from(ATTACKER, srv.url)
        raw = read_until_closed(extra, timeout=10)
        extra.close()
        status, body = status_and_body(raw)
        assert status == 429 and body["code"] == "too_many_connections", raw
        assert ATTACKER in body["error"] and "5" in body["error"]
        # Another client address is served meanwhile.
        transport = httpx.HTTPTransport(local_address="127.0.0.1")
        with httpx.Client(transport=transport, timeout=5) as c:
            assert c.get(srv.url + "/v1/status/leader").status_code == 200
        # A slot freed is a slot again.
        held.pop().close()

        def admitted() -> bool:
            s = open_from(ATTACKER, srv.url)
            try:
                s.sendall(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n")
                return s.recv(65536).startswith(b"HTTP/1.1 200")
            finally:
                s.close()

        wait_until(admitted, timeout=10)
    finally:
        for s in held:
            s.close()
        srv.stop()
