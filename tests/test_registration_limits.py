"""Registrations are bounded in size, and a 400 names the bound (issue 9, item 12).

A service with 50,000 tags used to be accepted. Meta follows Consul's limits (64 keys, keys of
at most 128 characters, values of at most 512); tags (128 of at most 256 characters) and
checks (32 per service or catalog registration) follow Trellis's, documented in the README.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.api_fixtures import assert_error

TTL = {"TTL": "10m"}


def _agent(app_client, body: dict) -> Any:
    return app_client.put("/v1/agent/service/register", json=body)


def _catalog(app_client, body: dict) -> Any:
    return app_client.put(
        "/v1/catalog/register", json={"Node": "n2", "Address": "10.0.0.2", **body}
    )


def _checks(n: int) -> dict:
    """``Check`` and ``Checks``, n checks in all."""
    checks = [{"CheckID": f"c{i}", "Name": f"c{i}", **TTL} for i in range(n)]
    return {"Check": checks[0], "Checks": checks[1:]} if checks else {}


REFUSED = {
    "50,000 tags": (_agent, {"Name": "web", "Tags": [f"t{i}" for i in range(50_000)]},
                    "at most 128 tags, not 50000"),
    "129 tags": (_agent, {"Name": "web", "Tags": [f"t{i}" for i in range(129)]},
                 "at most 128 tags, not 129"),
    "a tag of 257": (_agent, {"Name": "web", "Tags": ["t" * 257]}, "256"),
    "65 meta keys": (_agent, {"Name": "web", "Meta": {f"k{i}": "v" for i in range(65)}},
                     "at most 64 keys, not 65"),
    "a meta key of 129": (_agent, {"Name": "web", "Meta": {"k" * 129: "v"}}, "1-128"),
    "a meta value of 513": (_agent, {"Name": "web", "Meta": {"k": "v" * 513}},
                            "at most 512 characters"),
    "33 checks": (_agent, {"Name": "web", **_checks(33)}, "at most 32 checks, not 33"),
    "a sidecar with 129 tags": (
        _agent,
        {"Name": "web", "Connect": {"SidecarService": {"Tags": [f"t{i}" for i in range(129)]}}},
        "at most 128 tags",
    ),
    "catalog: 129 tags": (
        _catalog, {"Service": {"Service": "web", "Tags": [f"t{i}" for i in range(129)]}},
        "at most 128 tags",
    ),
    "catalog: 65 node meta keys": (_catalog, {"NodeMeta": {f"k{i}": "v" for i in range(65)}},
                                   "NodeMeta: may hold at most 64 keys"),
    "catalog: 33 checks": (_catalog, _checks(33), "at most 32 checks, not 33"),
}  # fmt: skip

ACCEPTED = {
    "128 tags of 256": (_agent, {"Name": "web", "Tags": [f"{i:03}" + "t" * 253
                                                         for i in range(128)]}),
    "64 meta keys of 128, values of 512": (
        _agent, {"Name": "web", "Meta": {f"{i:02}" + "k" * 126: "v" * 512 for i in range(64)}},
    ),
    "32 checks": (_agent, {"Name": "web", **_checks(32)}),
    "catalog: 32 checks, 128 tags, 64 node meta keys": (
        _catalog,
        {"Service": {"Service": "web", "Tags": [f"t{i}" for i in range(128)]},
         "NodeMeta": {f"k{i}": "v" for i in range(64)}, **_checks(32)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_oversized_registration_is_a_400_naming_the_limit(app_client, case: str) -> None:
    send, body, limit = REFUSED[case]
    before = app_client.get("/v1/catalog/services").get_json()
    assert_error(send(app_client, body), 400, "bad_request", limit)
    assert app_client.get("/v1/catalog/services").get_json() == before  # nothing stored


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_a_registration_at_the_limits_is_accepted(app_client, case: str) -> None:
    send, body = ACCEPTED[case]
    r = send(app_client, body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert "web" in app_client.get("/v1/catalog/services").get_json()
