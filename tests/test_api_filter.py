"""``?filter=`` is refused with a 400 on every endpoint, until Trellis evaluates filter
expressions: a client that filters must never get unfiltered results and believe them filtered.

The endpoints are taken from the app's route table, so a new route is covered without being
listed here; in-process, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from tests import api_fixtures
from tests.api_fixtures import assert_error, current_index, put_json, register

client = api_fixtures.client
make_client = api_fixtures.make_client

#: A value for each path variable of the routes; any other variable gets "x".
SAMPLES = {"key": "app/config", "service": "web", "service_id": "web", "name": "web"}
EXPRESSIONS = ['Service == "web"', "not a valid expression ((", "ServiceTags contains v1"]


def operations(app) -> list[tuple[str, str]]:
    """Every (METHOD, concrete path) the app routes."""
    ops = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(
            r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>",
            lambda m: SAMPLES.get(m.group(1), "x"),
            rule.rule,
        )
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            ops.append((method, path))
    return ops


def test_filter_is_refused_on_every_endpoint_and_changes_nothing(client, subtests):
    register(client, {"Name": "web", "Port": 80, "Tags": ["v1"]})
    assert put_json(client, "/v1/kv/app/config", "1").status_code == 200
    ops = operations(client.application)
    assert len(ops) > 60, ops  # the whole API, not a handful
    before = current_index(client)
    for method, path in ops:
        for expression in EXPRESSIONS:
            with subtests.test(method=method, path=path, filter=expression):
                r = client.open(f"{path}?filter={quote(expression)}", method=method, data=b"{}")
                assert_error(r, 400, "bad_request", "query parameter 'filter' is not supported")
    # Refused before any view ran: no write went through (the store's index did not move).
    assert current_index(client) == before
    assert client.get("/v1/kv/app/config?raw").get_data() == b"1"


def test_filter_is_refused_among_other_parameters_and_repeated(client):
    for url in (
        "/v1/catalog/services?filter=Service%20%3D%3D%20web&index=1&wait=1s",
        "/v1/health/service/web?passing&filter=Checks.Status%3D%3Dpassing",
        "/v1/agent/services?filter=&filter=Service%3D%3Dweb",
    ):
        assert_error(client.get(url), 400, "bad_request", "'filter' is not supported")


def test_an_empty_filter_filters_nothing_and_is_accepted(client):
    """As in Consul: ``?filter=`` with no expression is no filter."""
    register(client, {"Name": "web", "Port": 80})
    r = client.get("/v1/agent/services?filter=")
    assert r.status_code == 200 and set(r.get_json()) == {"web"}
    assert client.get("/v1/catalog/services?filter=%20").status_code == 200


def test_a_filter_on_an_unknown_route_is_still_404(client):
    assert_error(client.get("/v1/nothing/here?filter=a%3D%3Db"), 404, "not_found")
    assert_error(client.post("/v1/status/leader?filter=a%3D%3Db"), 405, "method_not_allowed")


def test_a_percent_encoded_filter_is_refused_too(client):
    # The hook looks at the raw query string first, for speed; "%66ilter" is "filter".
    r = client.get("/v1/catalog/services?%66ilter=" + quote('Service == "web"'))
    assert_error(r, 400, "bad_request", "query parameter 'filter' is not supported")
