"""Fixtures and helpers of the HTTP API tests (``tests/test_api_*.py``).

The app runs in-process under Flask's test client (no socket), once on a real SQLite file and
once on a fresh real PostgreSQL database (``store_url`` in ``tests/conftest.py``). Test modules
import the fixtures they use by name, e.g. ``from tests.api_fixtures import client``.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.openapi_check import ValidatingClient
from tests.support import wait_until  # noqa: F401 - re-exported to the API tests
from trellis.api.app import create_app
from trellis.api.settings import Settings, validate
from trellis.api.store import store_kind as kind_of

NODE = "test-node"


@pytest.fixture
def make_client(tmp_path, store_url) -> Callable[..., Any]:
    """Build the app on this test's store, with Settings overrides; every app is closed at
    teardown. Use it when a test needs settings of its own (limits, TTL check interval).

    The client checks every response against openapi.yaml (``tests.openapi_check``), as
    ``app_client`` does; ``client.raw`` is the unchecked Flask test client.
    """
    apps = []
    # Servers sharing a PostgreSQL store must be given the key that seals CA keys.
    seal_key = base64.b64encode(secrets.token_bytes(32)).decode()

    def make(**overrides: Any) -> ValidatingClient:
        overrides.setdefault("ca_seal_key", seal_key)
        settings = validate(
            Settings(data_dir=str(tmp_path), node_name=NODE, store=store_url, **overrides)
        )
        app = create_app(settings)
        apps.append(app)
        return ValidatingClient(app.test_client())

    yield make
    for app in apps:
        app.extensions["trellis"].close()


@pytest.fixture
def client(make_client):
    """The app with default settings, on SQLite and on PostgreSQL."""
    return make_client()


@pytest.fixture
def store_kind(store_url) -> str:
    return kind_of(store_url)


# -- helpers ---------------------------------------------------------------------------------


def index_of(resp) -> int:
    """The response's ``X-Consul-Index``, which every watched read must carry."""
    value = resp.headers.get("X-Consul-Index")
    assert value is not None, f"no X-Consul-Index on {resp.status_code} {resp.get_data()!r}"
    return int(value)


def current_index(client) -> int:
    """The store's global change index, as ``/v1/agent/self`` reports it."""
    return int(client.get("/v1/agent/self").get_json()["Stats"]["store"]["index"])


def parked(client) -> int:
    """How many blocking queries are parked right now."""
    return int(client.get("/v1/agent/self").get_json()["Stats"]["blocking"]["waiting"])


def put_json(client, url: str, body: Any):
    """PUT ``body`` as JSON (bytes and str are sent as they are)."""
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
    return client.put(url, data=body, content_type="application/json")


def register(client, body: Any) -> None:
    r = put_json(client, "/v1/agent/service/register", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() is None


def catalog_register(client, body: Any) -> None:
    r = put_json(client, "/v1/catalog/register", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() is True


def assert_error(resp, status: int, code: str | None = None, contains: str = "") -> dict:
    """An error response: the status, a JSON body ``{"error", "code", "status"}``, no HTML."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.mimetype == "application/json", resp.headers
    body = resp.get_json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body["status"] == status, body
    if code is not None:
        assert body["code"] == code, body
    assert contains in body["error"], body
    return body


class InThread:
    """A request run in a thread (a blocking query), timed from its start to its answer."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self.response: Any = None
        self.error: BaseException | None = None
        self.started = 0.0
        self.finished = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.response = self._call()
        except BaseException as e:  # re-raised in the test thread by result()
            self.error = e
        finally:
            self.finished = time.monotonic()

    def start(self) -> InThread:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 15.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"request still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.response

    @property
    def elapsed(self) -> float:
        return self.finished - self.started
