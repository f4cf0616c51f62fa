"""The ACL check of what a registration overwrites cannot be raced (issue 8, item 4).

A token with ``service:write`` on ``web`` only may not replace ``db``'s instance (or check)
by reusing its ID (``require_overwrite_write``, Consul's ``vetRegisterWithACL``). That check
read the node before the write's transaction, so ``db``'s registration landing in between was
overwritten. Here that other registration is made to land at the last moment before the
write: an injected store (the real one, with one call added) writes it when the view calls
``register``, after everything the view did before. The check now runs inside the write's
transaction (``Store.register``'s ``prepare``), so it sees ``db`` and refuses with 403.

In-process on SQLite and PostgreSQL; tests/test_integration_registration_races.py races
real registrations on a real server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.api_fixtures import NODE, assert_error, make_client  # noqa: F401 - fixture
from trellis.api.store.base import Check, Node, Registration, Service, Store

WEB_ONLY = 'service "web" { policy = "write" }\nnode_prefix "" { policy = "write" }'


class _LandsFirst:
    """The real store; the first ``register`` call first writes ``other`` (the registration
    that lands between the view's checks and its write)."""

    def __init__(self, inner: Store, other: Registration) -> None:
        self._inner = inner
        self._other: Registration | None = other

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def register(self, reg: Registration, **kw: Any) -> int:
        if self._other is not None:
            other, self._other = self._other, None
            self._inner.register(other)
        return self._inner.register(reg, **kw)


def _node() -> Node:
    return Node(name=NODE, id="", address="127.0.0.1", datacenter="dc1")


def _db_instance() -> Registration:
    return Registration(node=_node(), services=(Service(NODE, "x", "db", port=5432),),
                        keep_existing_node=True)  # fmt: skip


def _db_check() -> Registration:
    db = Service(NODE, "db-1", "db", port=5432)
    check = Check(NODE, "chk", "db alive", service_id="db-1", service_name="db")
    return Registration(node=_node(), services=(db,), checks=(check,), keep_existing_node=True)


CASES: dict[str, tuple[Callable[[], Registration], str, dict]] = {
    "agent service": (
        _db_instance,
        "/v1/agent/service/register",
        {"ID": "x", "Name": "web", "Port": 80},
    ),
    "catalog service": (
        _db_instance,
        "/v1/catalog/register",
        {
            "Node": NODE,
            "Address": "127.0.0.1",
            "SkipNodeUpdate": True,
            "Service": {"ID": "x", "Service": "web", "Port": 80},
        },
    ),
    "agent check": (
        _db_check,
        "/v1/agent/check/register",
        {"CheckID": "chk", "Name": "web alive", "ServiceID": "web-1", "TTL": "10m"},
    ),
}


def _web_only(make_client):  # noqa: F811
    """An app with ACLs on (default deny), a token that may write only ``web``, and web's
    instance ``web-1`` registered with it: (client, the token's headers, services, store)."""
    client = make_client(acl_enabled=True, acl_default_policy="deny")
    mgmt = {"X-Consul-Token": client.put("/v1/acl/bootstrap").get_json()["SecretID"]}
    r = client.put("/v1/acl/policy", json={"Name": "web-only", "Rules": WEB_ONLY}, headers=mgmt)
    assert r.status_code == 200, r.get_data(as_text=True)
    r = client.put("/v1/acl/token", json={"Policies": [{"Name": "web-only"}]}, headers=mgmt)
    web = {"X-Consul-Token": r.get_json()["SecretID"]}
    r = client.put("/v1/agent/service/register", json={"ID": "web-1", "Name": "web"}, headers=web)
    assert r.status_code == 200, r.get_data(as_text=True)
    svc = client.application.extensions["trellis"]
    store = svc.store
    return client, web, svc, store


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_a_registration_overwrites_is_checked_inside_its_write(make_client, case) -> None:  # noqa: F811
    other, path, body = CASES[case]
    client, web, svc, store = _web_only(make_client)
    svc.store = _LandsFirst(store, other())

    r = client.put(path, json=body, headers=web)

    assert_error(r, 403, "permission_denied", "service:write on 'db'")
    # db's instance and check are db's still.
    assert [s.name for s in store.services(node=NODE) if s.id == "x"] in ([], ["db"])
    if case == "agent check":
        (check,) = store.checks(node=NODE, check_id="chk")
        assert (check.service_name, check.name) == ("db", "db alive")
    else:
        assert [s.name for s in store.services(node=NODE) if s.id == "x"] == ["db"]


def _web_1_becomes_db() -> Registration:
    return Registration(node=_node(), services=(Service(NODE, "web-1", "db", port=5432),),
                        keep_existing_node=True)  # fmt: skip


CHECK_CASES: dict[str, tuple[str, dict]] = {
    "agent check": (
        "/v1/agent/check/register",
        {"CheckID": "new", "Name": "web alive", "ServiceID": "web-1", "TTL": "10m"},
    ),
    "catalog check": (
        "/v1/catalog/register",
        {
            "Node": NODE,
            "Address": "127.0.0.1",
            "SkipNodeUpdate": True,
            "Check": {"CheckID": "new", "Name": "web alive", "ServiceID": "web-1"},
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_a_check_does_not_land_on_a_service_replaced_meanwhile(make_client, case) -> None:  # noqa: F811
    """The check's service (``web-1``, web's) is read and vetted before the write; db's
    registration then takes the ID. The check must not end up on db's instance."""
    path, body = CHECK_CASES[case]
    client, web, svc, store = _web_only(make_client)
    svc.store = _LandsFirst(store, _web_1_becomes_db())

    r = client.put(path, json=body, headers=web)

    assert_error(r, 409, "conflict", "changed while its check 'new' was being registered")
    assert store.checks(node=NODE, check_id="new") == []
    assert [s.name for s in store.services(node=NODE) if s.id == "web-1"] == ["db"]
