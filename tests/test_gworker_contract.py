"""The gunicorn and gevent internals that Trellis's worker and server rely on, checked.

``api/gworker.py`` overrides methods of gunicorn's gevent worker and hands gunicorn wrapped
sockets; ``api/server.py`` builds gunicorn's listeners itself and hooks its arbiter. None of
that is gunicorn's public interface, so setup.cfg pins the versions tested, and this module
fails, with a message that names the assumption, if an upgrade changes any of it. The
behavioural tests drive gunicorn's real request loop (``AsyncWorker.handle``) in-process on a
socketpair, with Trellis's worker class and a tiny WSGI app.
"""

from __future__ import annotations

import configparser
import inspect
import json
import os
import socket
import threading
from importlib.metadata import version
from pathlib import Path

import gevent
import pytest
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config
from gunicorn.errors import HaltServer
from gunicorn.sock import TCP6Socket, TCPSocket
from gunicorn.workers.base import Worker
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from trellis.api.errors import RequestTimeout
from trellis.api.gworker import TrellisGeventWorker, _Corked, _Guarded


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


PINS = {"gunicorn": "27.0.1", "gevent": "26.9.0"}


def test_the_pins_are_the_versions_this_module_checks():
    # If this fails, setup.cfg admits (or this environment has) a version these checks were
    # not written against: run this module against it, then move the pins and PINS together.
    parser = configparser.ConfigParser()
    parser.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    requires = parser["options"]["install_requires"].split()
    for name, pinned in PINS.items():
        assert f"{name}=={pinned}" in requires, f"setup.cfg must pin {name}=={pinned}"
        assert version(name) == pinned


def test_the_methods_the_worker_overrides_keep_their_signatures():
    assert params(AsyncWorker.handle) == ["self", "listener", "client", "addr"]
    assert params(GeventWorker.handle) == ["self", "listener", "client", "addr"]
    assert params(AsyncWorker.handle_request) == ["self", "listener_name", "req", "sock", "addr"]
    assert params(GeventWorker.handle_request) == ["self", "listener_name", "req", "sock", "addr"]
    assert params(GeventWorker.run) == ["self"]
    assert params(GeventWorker.timeout_ctx) == ["self"]
    # The contract tests below build the worker with these arguments, as the arbiter does.
    assert params(Worker.__init__) == [
        *("self", "age", "ppid", "sockets", "app", "timeout", "cfg", "log")
    ]


def test_the_server_hooks_and_listener_classes_keep_their_shape():
    cfg = Config()

    def one(arbiter_or_worker):
        pass

    def two(arbiter, worker):
        pass

    # gunicorn checks a hook's arity when it is set; TrellisGunicorn's take exactly these.
    for name, hook in (
        ("when_ready", one),
        ("post_fork", two),
        ("post_worker_init", one),
        ("worker_exit", two),
    ):
        assert name in cfg.settings, name
        cfg.set(name, hook)
    for key in (
        "bind",
        "workers",
        "worker_class",
        "worker_connections",
        "threads",
        "timeout",
        "graceful_timeout",
        "keepalive",
        "loglevel",
        "accesslog",
        "preload_app",
        "proc_name",
        "limit_request_line",
        "control_socket_disable",
    ):
        assert key in cfg.settings, f"gunicorn has no setting {key!r} any more"
    assert params(TCPSocket.__init__)[:5] == ["self", "address", "conf", "log", "fd"]
    assert issubclass(TCP6Socket, TCPSocket)
    assert hasattr(Arbiter, "LISTENERS")
    assert "reason" in params(HaltServer.__init__)
    assert callable(BaseApplication.run) and callable(BaseApplication.load_config)


def test_gevent_io_watchers_keep_their_shape():
    # _Corked.on_readable: loop.io(fd, 1), .start(callback), .stop(), .close().
    a, b = socket.socketpair()
    try:
        watcher = gevent.get_hub().loop.io(a.fileno(), 1)
        fired = []
        watcher.start(lambda: fired.append(True))
        watcher.stop()
        watcher.close()
        assert fired == []
    finally:
        a.close()
        b.close()


class _App:
    """A WSGI app that reads the body and says what it saw of the environ."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def __call__(self, environ, start_response):
        self.seen["socket"] = environ.get("gunicorn.socket")
        try:
            body = environ["wsgi.input"].read()
        except RequestTimeout as e:
            out = json.dumps(e.to_json()).encode()
            start_response("408 Request Timeout", [("Content-Length", str(len(out)))])
            return [out]
        out = b"got " + body
        start_response("200 OK", [("Content-Length", str(len(out)))])
        return [out]


@pytest.fixture
def worker():
    """Make Trellis's worker without running it (no fork, no monkey-patching)."""
    made: list[TrellisGeventWorker] = []

    def make(body_timeout: float = 5.0) -> tuple[TrellisGeventWorker, _App]:
        cfg = Config()
        cfg.set("keepalive", 2)
        w = TrellisGeventWorker(0, os.getpid(), [], None, 30, cfg, glogging.Logger(cfg))
        made.append(w)
        app = _App()
        w.wsgi = app
        w.body_timeout = body_timeout
        return w, app

    yield make
    for w in made:
        w.tmp.close()


def serve_one(w: TrellisGeventWorker, data: bytes, *, close: bool) -> bytes:
    """Run gunicorn's request loop on one end of a socketpair; return what the client got."""
    server, client = socket.socketpair()
    listener = socket.socket()
    try:
        client.sendall(data)
        if close:
            client.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=w.handle, args=(listener, server, ("127.0.0.1", 1)))
        t.start()
        client.settimeout(10)
        got = b""
        while chunk := client.recv(65536):
            got += chunk
        t.join(10)
        assert not t.is_alive()
        return got
    finally:
        client.close()
        listener.close()


def test_the_request_loop_reads_through_our_socket_and_hands_it_on(worker):
    """gunicorn's parser reads from the object the worker passes as ``client`` (our deadline
    wrapper), handle_request receives it as ``sock``, environ["gunicorn.socket"] is the object
    our handle_request passes on (the corked socket), and the response goes out by sendall."""
    w, app = worker()
    got = serve_one(
        w,
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        close=True,
    )
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"got hello"), got
    assert isinstance(app.seen["socket"], _Corked)
    assert isinstance(app.seen["socket"]._sock, _Guarded)


def test_a_request_marked_must_close_is_answered_with_connection_close(worker):
    """The body deadline marks the request ``must_close``; gunicorn must then close."""
    w, _ = worker(body_timeout=0.2)
    got = serve_one(
        w,
        b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc",
        close=False,
    )
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got
    assert b"connection: close" in head.lower(), got
    assert json.loads(body)["code"] == "request_timeout"
