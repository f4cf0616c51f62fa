"""Parked blocking queries end when their client goes away, and answer when the server stops
(a real ``trellis server``, 1 worker).

Without this, a client that gives up on a ``?wait=10m`` query (a killed process, a client-side
timeout) leaves the query parked, holding a connection slot of its worker, until the wait runs
out. Raw sockets, so that the test controls exactly when a connection closes and what else it
sends.
"""

from __future__ import annotations

import json
import signal
import socket

import httpx
import pytest

from tests.support import TrellisProcess, server_args, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    # Every connection here comes from 127.0.0.1: the 200 parked leaf queries and the probes
    # beside them must not meet the per-client connection cap (its own tests are in
    # test_integration_http_limits.py), so it is raised above what these tests open.
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"limits": {"http_max_conns_per_client": 2000}}))
    p = TrellisProcess(
        [*server_args(tmp_path / "data", workers=1, node="n1"), "-config", str(config)]
    ).start()
    yield p
    p.stop()


def parked(url: str) -> int:
    return int(httpx.get(url + "/v1/agent/self").json()["Stats"]["blocking"]["waiting"])


def index_of(url: str, key: str) -> int:
    return int(httpx.get(f"{url}/v1/kv/{key}").headers["X-Consul-Index"])


@pytest.fixture
def connect():
    """Open raw connections to the server; every one is closed at teardown."""
    opened: list[socket.socket] = []

    def open_(url: str) -> socket.socket:
        host, port = url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)), timeout=10)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: trellis\r\n\r\n".encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One whole response (Content-Length bodies, as Trellis sends): status and body."""
    status, _, body = read_full_response(sock)
    return status, body


def read_full_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response: status, headers (lower-case names) and body."""
    status, headers, body, extra = read_one(sock, b"")
    assert not extra, "more than one response arrived"
    return status, headers, body


def read_one(sock: socket.socket, buf: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """The first response from ``buf`` and then the socket, and the bytes after it (the next
    responses: a pipelined one may arrive in the same read)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(head.split()[1]), headers, rest[:length], rest[length:]


def test_queries_of_clients_that_closed_are_ended(server, connect):
    url = server.url
    httpx.put(f"{url}/v1/kv/watched", content=b"v0")
    index = index_of(url, "watched")
    socks = [connect(url) for _ in range(40)]
    for s in socks:
        s.sendall(request(f"/v1/kv/watched?index={index}&wait=10m"))
    wait_until(lambda: parked(url) == 40, timeout=20)
    for s in socks[:30]:
        s.close()
    wait_until(lambda: parked(url) == 10, timeout=10)
    # The ten still connected are still parked, and a write answers them all.
    httpx.put(f"{url}/v1/kv/watched", content=b"v1")
    for s in socks[30:]:
        status, body = read_response(s)
        assert status == 200 and b'"Value":"djE="' in body
        s.close()
    wait_until(lambda: parked(url) == 0, timeout=10)


def test_a_pipelined_request_does_not_end_the_parked_query(server, connect):
    url = server.url
    httpx.put(f"{url}/v1/kv/piped", content=b"v0")
    index = index_of(url, "piped")
    s = connect(url)
    s.sendall(request(f"/v1/kv/piped?index={index}&wait=10m"))
    wait_until(lambda: parked(url) == 1, timeout=20)
    s.sendall(request("/v1/status/leader"))  # pipelined behind the parked query
    # The socket is readable now, but the client is still there: the query stays parked.
    with pytest.raises(AssertionError):
        wait_until(lambda: parked(url) == 0, timeout=1.0)
    httpx.put(f"{url}/v1/kv/piped", content=b"v1")
    # Both answers, in order, on the same connection; on a loaded machine the second can
    # arrive in the same read as the first.
    status, _, body, extra = read_one(s, b"")
    assert status == 200 and b'"Value":"djE="' in body
    status, _, body, extra = read_one(s, extra)
    assert not extra
    assert status == 200 and body.strip().startswith(b'"127.0.0.1:')
    s.close()


def test_the_agent_hash_wait_ends_too(server, connect):
    url = server.url
    h = httpx.get(f"{url}/v1/agent/services").headers["X-Consul-ContentHash"]
    socks = [connect(url) for _ in range(5)]
    for s in socks:
        s.sendall(request(f"/v1/agent/services?hash={h}&wait=10m"))
    wait_until(lambda: parked(url) == 5, timeout=20)
    for s in socks:
        s.close()
    wait_until(lambda: parked(url) == 0, timeout=10)
    # Ended quietly: a client that left is not a server error.
    out = server.output()
    assert "[ERROR]" not in out and "Traceback" not in out, out


def test_a_graceful_stop_answers_parked_queries_and_closes_idle_connections(server, connect):
    """SIGTERM: each parked query answers at once with what it has (same index), with
    ``Connection: close``; idle keep-alive connections, and connections that never sent a
    request, are closed; the server exits 0 without waiting out gunicorn's graceful timeout,
    and logs no error (issue 15, item 5: an ERROR traceback per idle connection before)."""
    url = server.url
    httpx.put(f"{url}/v1/kv/stopping", content=b"v0")
    index = index_of(url, "stopping")
    waiting = [connect(url) for _ in range(10)]
    for s in waiting:
        s.sendall(request(f"/v1/kv/stopping?index={index}&wait=10m"))
    idle = [connect(url) for _ in range(3)]
    for s in idle:
        s.sendall(request("/v1/status/leader"))
        assert read_response(s)[0] == 200  # the connection stays open, idle
    silent = [connect(url) for _ in range(3)]  # connected, never sent a byte
    wait_until(lambda: parked(url) == 10, timeout=20)
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    for s in waiting:
        status, headers, body = read_full_response(s)
        assert status == 200 and int(headers["x-consul-index"]) == index
        assert b'"Value":"djA="' in body
        assert headers.get("connection", "").lower() == "close"
        assert s.recv(1) == b""
    for s in idle + silent:
        assert s.recv(1) == b""
    out = server.output()
    assert "graceful timeout" not in out.lower()
    assert "[ERROR]" not in out and "Traceback" not in out, out


# -- the agent leaf endpoint parks the same way ------------------------------------------------

LEAF_QUERIES = 200


def leaf_index(url: str, service: str) -> int:
    r = httpx.get(f"{url}/v1/agent/connect/ca/leaf/{service}", timeout=30)
    assert r.status_code == 200, r.text
    return int(r.headers["X-Consul-Index"])


def test_parked_leaf_queries_of_clients_that_closed_are_ended(server, connect):
    """Issue 9, item 3: 200 clients that close leave no parked leaf query behind."""
    url = server.url
    index = leaf_index(url, "web")
    socks = [connect(url) for _ in range(LEAF_QUERIES)]
    for s in socks:
        s.sendall(request(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10m"))
    wait_until(lambda: parked(url) == LEAF_QUERIES, timeout=30)
    for s in socks[10:]:
        s.close()
    wait_until(lambda: parked(url) == 10, timeout=10)
    # The ten still connected are still parked, and a rotation answers them all with the
    # leaf of the new root.
    roots = httpx.post(f"{url}/v1/connect/ca/rotate", timeout=30).json()
    for s in socks[:10]:
        status, headers, body = read_full_response(s)
        assert status == 200 and int(headers["x-consul-index"]) > index
        assert json.loads(body)["RootID"] == roots["ActiveRootID"]
        s.close()
    wait_until(lambda: parked(url) == 0, timeout=10)
    out = server.output()
    assert "[ERROR]" not in out and "Traceback" not in out, out


def test_a_graceful_stop_answers_parked_leaf_and_hash_queries(server, connect):
    """SIGTERM: parked leaf and ``?hash=`` queries answer at once with what they have."""
    url = server.url
    index = leaf_index(url, "web")
    leaf = httpx.get(f"{url}/v1/agent/connect/ca/leaf/web").json()
    h = httpx.get(f"{url}/v1/agent/services").headers["X-Consul-ContentHash"]
    leaves = [connect(url) for _ in range(5)]
    for s in leaves:
        s.sendall(request(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10m"))
    hashes = [connect(url) for _ in range(5)]
    for s in hashes:
        s.sendall(request(f"/v1/agent/services?hash={h}&wait=10m"))
    wait_until(lambda: parked(url) == 10, timeout=20)
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    for s in leaves:
        status, headers, body = read_full_response(s)
        assert status == 200 and int(headers["x-consul-index"]) == index
        assert json.loads(body)["SerialNumber"] == leaf["SerialNumber"]
        assert headers.get("connection", "").lower() == "close"
    for s in hashes:
        status, headers, _ = read_full_response(s)
        assert status == 200 and headers["x-consul-contenthash"] == h
        assert headers.get("connection", "").lower() == "close"
    assert "graceful timeout" not in server.output().lower()


def test_parked_queries_per_client_are_capped_and_released_on_disconnect(tmp_path, connect):
    """``blocking.max_per_client``: past it a query answers at once; a client that closes
    gives its places back."""
    config = tmp_path / "capped.json"
    config.write_text(json.dumps({"blocking": {"max_per_client": 5}}))
    p = TrellisProcess(
        [*server_args(tmp_path / "data", workers=1, node="n1"), "-config", str(config)]
    )
    p.start()
    try:
        url = p.url
        httpx.put(f"{url}/v1/kv/capped", content=b"v0")
        index = index_of(url, "capped")
        held = [connect(url) for _ in range(5)]
        for s in held:
            s.sendall(request(f"/v1/kv/capped?index={index}&wait=10m"))
        wait_until(lambda: parked(url) == 5, timeout=20)
        extra = connect(url)
        extra.sendall(request(f"/v1/kv/capped?index={index}&wait=10m"))
        extra.settimeout(5)  # answered now, not in ten minutes
        status, headers, body = read_full_response(extra)
        assert status == 200 and int(headers["x-consul-index"]) == index
        assert b'"Value":"djA="' in body
        assert parked(url) == 5
        for s in held:
            s.close()
        wait_until(lambda: parked(url) == 0, timeout=10)
        again = [connect(url) for _ in range(5)]
        for s in again:
            s.sendall(request(f"/v1/kv/capped?index={index}&wait=10m"))
        wait_until(lambda: parked(url) == 5, timeout=20)
        httpx.put(f"{url}/v1/kv/capped", content=b"v1")
        for s in again:
            assert read_response(s)[0] == 200
    finally:
        p.stop()
