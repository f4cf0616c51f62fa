"""A blocking read's ``X-Consul-Index`` never claims a write its result does not hold.

A client sends the index of its last answer back as ``?index=``; the server parks the query
until the result's index is above it. So if an answer carries the index of a write but the
state from before that write, the client's next query finds "nothing new" and waits out its
whole ``wait`` with the stale state: the lost wake-up of the intention fan-out (a sidecar kept a
deleted deny for a minute; see tests/test_integration_blocking_wakeups.py). That happened when a
view read its result and then, in another read, its index, and a write committed between the
two.

Here the interleaving is forced, at every point: the app under test reads through a store that,
once armed, lets another app (another worker, on the same database) commit a write right after
the request's k-th store read, for every k the request reaches. After each such answer, the
answer's index must not reach the index of the state with the write unless it holds the write,
and a blocking query sent back with the answer's index must come back promptly with the write.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.api_fixtures import NODE, index_of
from tests.openapi_check import ValidatingClient
from trellis.api.app import create_app
from trellis.api.settings import Settings, validate
from trellis.api.store import SQLITE, store_kind
from trellis.api.store.postgres import PostgresStore
from trellis.api.store.sqlite import SQLiteStore

#: A blocking query sent back with a stale answer's index must see the write within this long
#: (the other app's write reaches this app's change feed through its follower).
PROMPT = 2.0


@dataclass
class Plan:
    """Commit ``write`` (in another thread) right after the ``at``-th read of ``thread``."""

    thread: int
    at: int
    write: Callable[[], None]
    reads: int = 0


def interleaved_store(url: str) -> Any:
    """The real store of ``url``, with one addition: an armed ``plan`` (see Plan)."""
    if store_kind(url) == SQLITE:
        base: type = SQLiteStore
        arg = url[len("sqlite:///") :]
    else:
        base, arg = PostgresStore, url

    class Interleaved(base):  # type: ignore[misc, valid-type]
        plan: Plan | None = None

        @contextmanager
        def read(self) -> Iterator[Any]:
            with super().read() as q:
                yield q
            self._after_read()

        def topic_indexes(self, *topics: str) -> dict[str, int]:
            out = super().topic_indexes(*topics)
            self._after_read()
            return out

        def _after_read(self) -> None:
            plan = self.plan
            if plan is None or plan.thread != threading.get_ident():
                return
            plan.reads += 1
            if plan.reads == plan.at:
                # Another worker's write, committed while this request is between two reads.
                t = threading.Thread(target=plan.write, daemon=True)
                t.start()
                t.join(30)
                assert not t.is_alive()

    return Interleaved(arg)


@pytest.fixture
def apps(tmp_path, store_url) -> Iterator[tuple[Any, ValidatingClient, ValidatingClient]]:
    """The app under test (on the interleaving store) and another app on the same database."""
    seal_key = base64.b64encode(secrets.token_bytes(32)).decode()
    made = []

    def settings(node: str) -> Settings:
        return validate(
            Settings(data_dir=str(tmp_path), node_name=node, store=store_url, ca_seal_key=seal_key)
        )

    try:
        store = interleaved_store(store_url)
        made.append(create_app(settings(NODE), store=store))
        made.append(create_app(settings("other-node")))
        yield (
            store,
            ValidatingClient(made[0].test_client()),
            ValidatingClient(made[1].test_client()),
        )
    finally:
        for app in made:
            app.extensions["trellis"].close()


def _json(r) -> Any:
    return r.get_json() if r.status_code == 200 else None


INTENTION = "/v1/connect/intentions/exact?source=web&destination=db"
SERVICE = {
    "Node": "n2",
    "Address": "10.0.0.2",
    "Service": {"Service": "web", "ID": "web-1", "Port": 80},
    "Check": {
        "Name": "web-alive",
        "CheckID": "web-alive",
        "Status": "passing",
        "ServiceID": "web-1",
    },
}


def _ok(r) -> None:
    assert r.status_code == 200, (r.status_code, r.get_data(as_text=True))


WRITES: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "intention": (
        lambda c: c.put(INTENTION, data=json.dumps({"Action": "deny"})),
        lambda c: c.delete(INTENTION),
    ),
    "kv": (lambda c: c.put("/v1/kv/app/x", data=b"1"), lambda c: c.delete("/v1/kv/app/x")),
    "catalog": (
        lambda c: c.put("/v1/catalog/register", data=json.dumps(SERVICE)),
        lambda c: c.put("/v1/catalog/deregister", data=json.dumps({"Node": "n2"})),
    ),
}

#: (read, the writes that concern it, whether an answer holds the state with the write).
CASES: dict[str, tuple[str, str, Callable[[Any], bool]]] = {
    "intentions-match": (
        "/v1/connect/intentions/match?by=destination&name=db",
        "intention",
        lambda r: any(i["SourceName"] == "web" for i in _json(r)["db"]),
    ),
    "intentions-list": (
        "/v1/connect/intentions",
        "intention",
        lambda r: any(i["SourceName"] == "web" for i in _json(r)),
    ),
    "intentions-exact": (INTENTION, "intention", lambda r: r.status_code == 200),
    "kv-key": ("/v1/kv/app/x", "kv", lambda r: r.status_code == 200),
    "kv-recurse": ("/v1/kv/app/?recurse", "kv", lambda r: r.status_code == 200),
    "kv-keys": ("/v1/kv/app/?keys", "kv", lambda r: r.status_code == 200),
    "catalog-services": ("/v1/catalog/services", "catalog", lambda r: "web" in _json(r)),
    "catalog-service": ("/v1/catalog/service/web", "catalog", lambda r: bool(_json(r))),
    "catalog-nodes": (
        "/v1/catalog/nodes",
        "catalog",
        lambda r: any(n["Node"] == "n2" for n in _json(r)),
    ),
    "catalog-node": ("/v1/catalog/node/n2", "catalog", lambda r: bool(_json(r))),
    "health-service": ("/v1/health/service/web", "catalog", lambda r: bool(_json(r))),
    "health-checks": ("/v1/health/checks/web", "catalog", lambda r: bool(_json(r))),
    "health-node": ("/v1/health/node/n2", "catalog", lambda r: bool(_json(r))),
    "health-state": (
        "/v1/health/state/any",
        "catalog",
        lambda r: any(c["Node"] == "n2" for c in _json(r)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_write_between_two_reads_of_a_view_never_hides_behind_its_index(apps, case):
    store, client, other = apps
    path, topic, holds = CASES[case]
    put, delete = WRITES[topic]
    on = False
    sep = "&" if "?" in path else "?"
    for at in range(1, 50):
        want = not on
        plan = Plan(
            threading.get_ident(), at, lambda want=want: _ok((put if want else delete)(other))
        )
        store.plan = plan
        try:
            r = client.get(path)
        finally:
            store.plan = None
        if plan.reads < at:
            assert at > 1, "the view read nothing from the store"
            return  # every point between two of the view's reads was tried
        on = want
        assert r.status_code in (200, 404), r.get_data(as_text=True)
        # What a request that starts after the write answers (it holds the write).
        after = client.get(path)
        assert holds(after) is on, (after.status_code, after.get_data(as_text=True))
        if index_of(r) >= index_of(after):
            assert holds(r) is on, (
                f"write after read {at}: the answer carries index {index_of(r)}, that of the"
                f" state {'with' if on else 'without'} the write, but holds the state before it"
            )
        if holds(r) is on:
            continue  # the write was read in time: nothing for the next query to catch up on
        # A stale answer: the client's next query, with its index, gets the write at once.
        t0 = time.monotonic()
        nxt = client.get(f"{path}{sep}index={index_of(r)}&wait=10s")
        took = time.monotonic() - t0
        assert holds(nxt) is on and took < PROMPT, (at, took, nxt.get_data(as_text=True))
    raise AssertionError("the view never stopped reading")
