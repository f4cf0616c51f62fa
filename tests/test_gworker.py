"""Trellis's gevent worker (``api/gworker.py``): one send per response, and the hint that lets a
batch of woken blocking queries answer before any of them reads its next request.

The socket is a small recording object; the hint is exercised through the real app (a blocking
K/V read in a thread, woken by a PUT), with the recording socket in the WSGI environ where
gunicorn puts it.
"""

from __future__ import annotations

import pytest

from tests import api_fixtures
from tests.api_fixtures import InThread, index_of, parked, wait_until
from trellis.api.gworker import _Corked

client = api_fixtures.client
make_client = api_fixtures.make_client


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.shut = False

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def shutdown(self, how: int) -> None:
        self.shut = True


def test_head_and_body_go_out_in_one_send():
    sock = RecordingSocket()
    c = _Corked(sock)
    c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert sock.sent == []  # held back
    c.sendall(b"body")
    c.sendall(b"more")
    c.flush()
    assert sock.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


def test_a_response_without_a_body_still_sends_its_head():
    sock = RecordingSocket()
    c = _Corked(sock)
    c.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    c.flush()
    c.flush()  # idempotent
    assert sock.sent == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_any_other_socket_call_sends_the_held_head_first():
    sock = RecordingSocket()
    c = _Corked(sock)
    c.sendall(b"HEAD")
    c.shutdown(2)
    assert sock.sent == [b"HEAD"] and sock.shut


class HintSocket:
    """Stands in for the worker's corked socket in ``environ["gunicorn.socket"]``."""

    def __init__(self) -> None:
        self.woken = False


@pytest.fixture
def hint_get(client):
    def get(url: str) -> tuple[object, HintSocket]:
        sock = HintSocket()
        return client.get(url, environ_base={"gunicorn.socket": sock}), sock

    return get


def test_a_woken_blocking_query_sets_the_hint(client, hint_get):
    client.put("/v1/kv/hint", data=b"a")
    index = index_of(client.get("/v1/kv/hint"))
    q = InThread(lambda: hint_get(f"/v1/kv/hint?index={index}&wait=10s")).start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done()
    client.put("/v1/kv/hint", data=b"b")
    resp, sock = q.result()
    assert resp.status_code == 200 and index_of(resp) > index
    assert sock.woken is True


def test_reads_that_were_not_woken_leave_the_hint_alone(client, hint_get):
    client.put("/v1/kv/hint", data=b"a")
    index = index_of(client.get("/v1/kv/hint"))
    plain, sock = hint_get("/v1/kv/hint")
    assert plain.status_code == 200 and sock.woken is False
    stale, sock = hint_get(f"/v1/kv/hint?index={index - 1}&wait=10s")  # answers at once
    assert stale.status_code == 200 and sock.woken is False
    timed_out, sock = hint_get(f"/v1/kv/hint?index={index}&wait=200ms")  # nothing changes
    assert timed_out.status_code == 200 and index_of(timed_out) == index
    assert sock.woken is False
