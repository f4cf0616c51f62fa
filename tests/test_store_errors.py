"""The store's interface and its errors (issue 8, item 6).

* Both implementations have exactly the ``Store`` Protocol's signatures (mypy checks the same
  through ``open_store``'s return type; this check runs without mypy).
* The store speaks store errors (``trellis.api.store.errors``), never HTTP errors or a bare
  ``KeyError``, on both databases; the HTTP boundary translates them once (``api/app.py``).
"""

from __future__ import annotations

import base64
import inspect
import secrets
import threading
from typing import Any

import pytest

from tests.api_fixtures import assert_error, make_client, put_json  # noqa: F401 - fixtures
from trellis.api.app import create_app
from trellis.api.errors import StoreUnavailable, TrellisError
from trellis.api.settings import Settings, validate
from trellis.api.store import open_store
from trellis.api.store.base import Store
from trellis.api.store.errors import (
    NotFoundInStore,
    StoreConflict,
    StoreError,
    UnstorableValue,
)
from trellis.api.store.postgres import PostgresStore
from trellis.api.store.security import ACLPolicy, ACLToken, IntentionRecord
from trellis.api.store.sqlite import SQLiteStore


def _protocol_methods() -> list[str]:
    return sorted(n for n, v in vars(Store).items() if callable(v) and not n.startswith("_"))


def test_the_store_protocol_covers_intentions_and_acls() -> None:
    names = set(_protocol_methods())
    assert {"intention_put", "intention_exact", "acl_token_put", "acl_policy_delete"} <= names
    # Every public method the control plane calls on a store is in the Protocol.
    assert {"register", "system_write", "kv_put", "acl_tokens", "intentions"} <= names


@pytest.mark.parametrize("impl", [SQLiteStore, PostgresStore])
def test_both_stores_have_the_protocols_signatures(impl: type) -> None:
    for name in _protocol_methods():
        assert hasattr(impl, name), f"{impl.__name__} lacks {name}"
        want = inspect.signature(getattr(Store, name))
        got = inspect.signature(getattr(impl, name))
        assert got == want, f"{impl.__name__}.{name}{got} differs from Store.{name}{want}"


def _intention(source: str, destination: str, rid: str) -> IntentionRecord:
    return IntentionRecord(
        id=rid,
        source=source,
        destination=destination,
        action="allow",
        created_at="2026-01-01T00:00:00Z",
        updated_at="2026-01-01T00:00:00Z",
    )


def _refused(op: Any, kind: type[StoreError]) -> StoreError:
    with pytest.raises(StoreError) as info:
        op()
    assert isinstance(info.value, kind), repr(info.value)
    # A store error is not an HTTP error: only the boundary decides the status.
    assert not isinstance(info.value, TrellisError)
    assert info.value.message
    return info.value


def test_store_refusals_are_store_errors_and_write_nothing(store: Store) -> None:
    store.acl_policy_put(ACLPolicy(id="p1", name="ops"), create=True)
    store.acl_token_put(ACLToken(accessor_id="a1", secret_hash="h1"), create=True)
    store.intention_put(_intention("web", "db", "i1"), create_only=True)
    store.intention_put(_intention("api", "db", "i2"), create_only=True)
    before = store.current_index()

    _refused(lambda: store.acl_policy_put(ACLPolicy(id="p1", name="x"), create=True), StoreConflict)
    _refused(
        lambda: store.acl_policy_put(ACLPolicy(id="p2", name="ops"), create=True), StoreConflict
    )
    _refused(
        lambda: store.acl_token_put(ACLToken(accessor_id="a1", secret_hash="h2"), create=True),
        StoreConflict,
    )
    _refused(
        lambda: store.acl_token_put(ACLToken(accessor_id="a2", secret_hash="h1"), create=True),
        StoreConflict,
    )
    _refused(
        lambda: store.intention_put(_intention("web", "db", "i3"), create_only=True),
        StoreConflict,
    )
    # Moving i2 onto the pair i1 holds.
    _refused(
        lambda: store.intention_put(_intention("web", "db", "i2"), expect_id="i2"), StoreConflict
    )
    # Updating an intention that is gone: it used to be a bare KeyError.
    _refused(
        lambda: store.intention_put(_intention("x", "y", "gone"), expect_id="gone"),
        NotFoundInStore,
    )
    _refused(lambda: store.acl_policy_put(ACLPolicy(id="p\x00", name="n"), create=True),
             UnstorableValue)  # fmt: skip

    assert store.current_index() == before
    assert [p.id for p in store.acl_policies()] == ["p1"]
    assert [t.accessor_id for t in store.acl_tokens()] == ["a1"]
    assert sorted(i.id for i in store.intentions()) == ["i1", "i2"]
    # Updates of what does not exist are not errors: None, as the docstrings say.
    assert store.acl_token_put(ACLToken(accessor_id="zz", secret_hash="h9"), create=False) is None
    assert store.acl_policy_put(ACLPolicy(id="zz", name="zz"), create=False) is None


class _DeletingStore:
    """The real store, except that reading an intention lets a concurrent delete of it land
    right after: the window between a view's read and its write, made deterministic."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def intention(self, intention_id: str) -> IntentionRecord | None:
        rec = self._inner.intention(intention_id)
        self._inner.intention_delete(intention_id)
        return rec


def test_store_errors_become_http_errors_once_at_the_boundary(make_client) -> None:  # noqa: F811
    client = make_client()
    svc = client.application.extensions["trellis"]
    body = {"SourceName": "web", "DestinationName": "db", "Action": "allow"}
    r = client.post("/v1/connect/intentions", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    rid = r.get_json()["ID"]
    # A second create of the same pair: StoreConflict -> 409.
    assert_error(client.post("/v1/connect/intentions", json=body), 409, "conflict", "exists")
    # An update whose intention is deleted between the view's read and its write:
    # NotFoundInStore -> 404 (the view used to catch a KeyError for this).
    svc.store = _DeletingStore(svc.store)
    r = put_json(
        client,
        f"/v1/connect/intentions/{rid}",
        {"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert_error(r, 404, "not_found", rid)


# -- ensure_builtins: a lost race is harmless, an outage is not swallowed ----------------------


class _WritesDown:
    """The real store with its ACL writes failing as a store outage does (reads still work:
    a PostgreSQL primary gone read-only, a SQLite write lock held past the timeout)."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def acl_policy_put(self, *args: Any, **kw: Any) -> Any:
        raise StoreUnavailable(
            "the store is unavailable: cannot execute in a read-only transaction"
        )

    acl_token_put = acl_policy_put


class _StaleReads:
    """The real store, whose ACL reads answer as if made just before another worker created
    the built-in objects: the race ``ensure_builtins`` must lose quietly."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def acl_policy(self, **kw: Any) -> None:
        return None

    def acl_token(self, **kw: Any) -> None:
        return None


def _acl_settings(tmp_path, store_url: str) -> Settings:
    return validate(
        Settings(
            data_dir=str(tmp_path),
            node_name="n1",
            store=store_url,
            acl_enabled=True,
            acl_default_policy="deny",
            ca_seal_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        )
    )


def test_a_store_outage_while_ensuring_acl_builtins_surfaces(tmp_path, store: Store) -> None:
    settings = _acl_settings(tmp_path, "sqlite:///unused")
    # It used to be swallowed by `except Exception: pass`: the server started without the
    # global-management policy and the anonymous token, and said nothing.
    with pytest.raises(StoreUnavailable, match="read-only"):
        create_app(settings, store=_WritesDown(store), background=False)  # type: ignore[arg-type]
    assert store.acl_policies() == [] and store.acl_tokens() == []


def test_losing_the_race_to_create_acl_builtins_is_harmless(tmp_path, store: Store) -> None:
    settings = _acl_settings(tmp_path, "sqlite:///unused")
    first = create_app(settings, store=store, background=False)
    # Another worker starts, reads "missing" (stale), writes, and meets StoreConflict.
    second = create_app(settings, store=_StaleReads(store), background=False)  # type: ignore[arg-type]
    assert [p.name for p in store.acl_policies()] == ["global-management"]
    assert [t.description for t in store.acl_tokens()] == ["Anonymous Token"]
    assert first and second


def test_workers_starting_together_all_ensure_acl_builtins(tmp_path, store_url: str) -> None:
    """Real concurrency: eight "workers", each its own store on one database, at once."""
    settings = _acl_settings(tmp_path, store_url)
    stores = [open_store(store_url) for _ in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def start(s: Store) -> None:
        try:
            barrier.wait()
            create_app(settings, store=s, background=False)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert [p.name for p in stores[0].acl_policies()] == ["global-management"]
        assert [t.description for t in stores[0].acl_tokens()] == ["Anonymous Token"]
    finally:
        for s in stores:
            s.close()
