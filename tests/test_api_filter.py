"""``?filter=`` through the real app, on SQLite and on PostgreSQL.

The endpoints where Consul filters evaluate the expression (trellis.proxy.bexpr) and return
only what it keeps; an invalid expression is a 400 that says where it failed. Every other
endpoint refuses a filter with a 400: a client that filters must never get unfiltered results
and believe them filtered. The endpoints are taken from the app's route table, so a new route
is covered without being listed here.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from tests import api_fixtures
from tests.api_fixtures import (
    NODE,
    InThread,
    assert_error,
    catalog_register,
    current_index,
    index_of,
    parked,
    put_json,
    register,
    wait_until,
)

client = api_fixtures.client
make_client = api_fixtures.make_client

#: A value for each path variable of the routes; any other variable gets "x".
SAMPLES = {
    "key": "app/config",
    "service": "web",
    "service_id": "web",
    "name": "web",
    "state": "any",
}
EXPRESSIONS = ['Service == "web"', "not a valid expression ((", "ServiceTags contains v1"]

#: Where Consul evaluates ``filter`` (its API documentation, endpoint by endpoint) and
#: Trellis has the endpoint.
FILTERABLE = {
    ("GET", "/v1/catalog/nodes"),
    ("GET", "/v1/catalog/services"),
    ("GET", "/v1/catalog/service/web"),
    ("GET", "/v1/catalog/connect/web"),
    ("GET", "/v1/catalog/node/x"),
    ("GET", "/v1/catalog/node-services/x"),
    ("GET", "/v1/health/node/x"),
    ("GET", "/v1/health/ingress/web"),
    ("GET", "/v1/health/checks/web"),
    ("GET", "/v1/health/service/web"),
    ("GET", "/v1/health/connect/web"),
    ("GET", "/v1/health/state/any"),
    ("GET", "/v1/agent/services"),
    ("GET", "/v1/agent/checks"),
    ("GET", "/v1/agent/members"),
    ("GET", "/v1/connect/intentions"),
}


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


def get(client, url: str, expression: str):
    sep = "&" if "?" in url else "?"
    return client.get(f"{url}{sep}filter={quote(expression)}")


def test_filter_is_refused_where_it_is_not_evaluated_and_changes_nothing(client, subtests):
    register(client, {"Name": "web", "Port": 80, "Tags": ["v1"]})
    assert put_json(client, "/v1/kv/app/config", "1").status_code == 200
    ops = operations(client.application)
    assert len(ops) > 60, ops  # the whole API, not a handful
    assert FILTERABLE <= set(ops), FILTERABLE - set(ops)
    before = current_index(client)
    for method, path in ops:
        if (method, path) in FILTERABLE:
            continue
        for expression in EXPRESSIONS:
            with subtests.test(method=method, path=path, filter=expression):
                r = client.open(f"{path}?filter={quote(expression)}", method=method, data=b"{}")
                assert_error(r, 400, "bad_request", "query parameter 'filter' is not supported")
    # Refused before any view ran: no write went through (the store's index did not move).
    assert current_index(client) == before
    assert client.get("/v1/kv/app/config?raw").get_data() == b"1"


def test_every_filterable_endpoint_refuses_an_invalid_expression_with_its_position(
    client, subtests
):
    for _, path in sorted(FILTERABLE):
        for expression, position in (
            ("not a valid expression ((", 7),  # "a" is no operator
            ("NoSuchField == 1", 1),
            ('"x" in', 7),
        ):
            with subtests.test(path=path, filter=expression):
                body = assert_error(get(client, path, expression), 400, "bad_request")
                assert body["error"].startswith("query parameter 'filter': "), body
                assert body["error"].endswith(f"(at position {position})"), body


def test_filter_is_refused_among_other_parameters_and_repeated(client):
    for url in (
        "/v1/kv/app?recurse&filter=Key%20%3D%3D%20web&index=1&wait=1s",
        "/v1/status/leader?filter=Checks.Status%3D%3Dpassing",
        "/v1/agent/self?filter=&filter=Service%3D%3Dweb",
    ):
        assert_error(client.get(url), 400, "bad_request", "'filter' is not supported")
    # Two expressions where one is evaluated: refused rather than one picked.
    r = client.get("/v1/agent/services?filter=Service%3D%3Dweb&filter=Port%3D%3D1")
    assert_error(r, 400, "bad_request", "one 'filter' parameter")


def test_an_empty_filter_filters_nothing_and_is_accepted(client):
    """As in Consul: ``?filter=`` with no expression is no filter."""
    register(client, {"Name": "web", "Port": 80})
    r = client.get("/v1/agent/services?filter=")
    assert r.status_code == 200 and set(r.get_json()) == {"web"}
    assert client.get("/v1/catalog/services?filter=%20").status_code == 200
    assert client.get("/v1/kv/app?filter=").status_code == 404  # no key, and no refusal


def test_a_filter_on_an_unknown_route_is_still_404(client):
    assert_error(client.get("/v1/nothing/here?filter=a%3D%3Db"), 404, "not_found")
    assert_error(client.post("/v1/status/leader?filter=a%3D%3Db"), 405, "method_not_allowed")


def test_a_percent_encoded_filter_is_refused_too(client):
    # The hook looks at the raw query string first, for speed; "%66ilter" is "filter".
    r = client.get("/v1/status/leader?%66ilter=" + quote('Service == "web"'))
    assert_error(r, 400, "bad_request", "query parameter 'filter' is not supported")
    r = client.get("/v1/catalog/nodes?%66ilter=" + quote("Nope == 1"))
    assert_error(r, 400, "bad_request", "unknown selector 'Nope'")


# -- each endpoint -----------------------------------------------------------------------------


def _catalog(client) -> None:
    """Two external nodes with web and db instances and checks, beside the server's own."""
    catalog_register(
        client,
        {
            "Node": "n1",
            "Address": "192.0.2.1",
            "NodeMeta": {"os": "linux"},
            "Service": {
                "ID": "web-1",
                "Service": "web",
                "Tags": ["v1"],
                "Port": 8080,
                "Meta": {"env": "prod"},
            },
            "Checks": [
                {"CheckID": "web-1-up", "Name": "up", "ServiceID": "web-1", "Status": "passing"},
                {"CheckID": "disk", "Name": "disk", "Status": "warning"},
            ],
        },
    )
    catalog_register(
        client,
        {
            "Node": "n2",
            "Address": "192.0.2.2",
            "NodeMeta": {"os": "freebsd"},
            "Service": {
                "ID": "web-2",
                "Service": "web",
                "Tags": ["v2"],
                "Port": 8081,
                "Meta": {"env": "qa"},
            },
            "Check": {
                "CheckID": "web-2-up",
                "Name": "up",
                "ServiceID": "web-2",
                "Status": "critical",
            },
        },
    )
    catalog_register(
        client,
        {
            "Node": "n2",
            "Address": "192.0.2.2",
            "NodeMeta": {"os": "freebsd"},
            "Service": {"ID": "db-1", "Service": "db", "Tags": ["v1", "primary"], "Port": 5432},
        },
    )
    catalog_register(
        client,
        {
            "Node": "n2",
            "Address": "192.0.2.2",
            "NodeMeta": {"os": "freebsd"},
            "Service": {
                "ID": "web-2-sidecar-proxy",
                "Service": "web-sidecar-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {"DestinationServiceName": "web", "LocalServicePort": 8081},
            },
        },
    )


def ok(r):
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def test_catalog_endpoints(client):
    _catalog(client)
    nodes = ok(get(client, "/v1/catalog/nodes", 'Meta.os == "linux" or Node matches "^n2$"'))
    assert [n["Node"] for n in nodes] == ["n1", "n2"]
    assert [n["Node"] for n in ok(get(client, "/v1/catalog/nodes", "Meta is empty"))] == [NODE]

    # catalog/services: the filter runs on instances; names and tags of those it keeps.
    assert ok(get(client, "/v1/catalog/services", '"v1" in ServiceTags')) == {
        "web": ["v1"],
        "db": ["v1", "primary"],
    }
    assert ok(get(client, "/v1/catalog/services", 'ServiceMeta.env == "qa"')) == {"web": ["v2"]}
    assert ok(get(client, "/v1/catalog/services", 'NodeMeta.os == "freebsd" and Node != n2')) == {}

    insts = ok(get(client, "/v1/catalog/service/web", 'ServiceMeta.env == "qa"'))
    assert [i["ServiceID"] for i in insts] == ["web-2"]
    insts = ok(get(client, "/v1/catalog/service/web", "ServicePort != 8081 and Node == n1"))
    assert [i["ServiceID"] for i in insts] == ["web-1"]
    # Combined with ?tag (which Consul deprecates in favour of filter), both apply.
    assert ok(get(client, "/v1/catalog/service/web?tag=v1", 'Node == "n2"')) == []

    proxies = ok(get(client, "/v1/catalog/connect/web", "ServiceProxy.LocalServicePort == 8081"))
    assert [p["ServiceID"] for p in proxies] == ["web-2-sidecar-proxy"]
    assert ok(get(client, "/v1/catalog/connect/web", 'ServiceKind == ""')) == []

    # catalog/node/{node}: the filter runs on the node's services.
    node = ok(get(client, "/v1/catalog/node/n2", 'Tags contains "primary"'))
    assert node["Node"]["Node"] == "n2" and set(node["Services"]) == {"db-1"}
    node = ok(get(client, "/v1/catalog/node/n2", 'Kind == "connect-proxy"'))
    assert set(node["Services"]) == {"web-2-sidecar-proxy"}


def test_an_operator_the_grammar_lacks_is_refused(client):
    # ">" is not one of Consul's operators for these endpoints.
    r = get(client, "/v1/catalog/services", "ServicePort > 1")
    assert_error(r, 400, "bad_request", "expected an operator")


def test_health_endpoints(client):
    _catalog(client)
    entries = ok(get(client, "/v1/health/service/web", 'Checks.Status == "critical"'))
    assert [e["Service"]["ID"] for e in entries] == ["web-2"]
    entries = ok(get(client, "/v1/health/service/web", 'Service.Tags contains "v1"'))
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]
    entries = ok(get(client, "/v1/health/service/web", 'Node.Meta.os == "freebsd"'))
    assert [e["Service"]["ID"] for e in entries] == ["web-2"]
    # ?passing applies first, then the filter.
    assert ok(get(client, "/v1/health/service/web?passing", 'Node.Node == "n2"')) == []

    entries = ok(get(client, "/v1/health/connect/web", "Service.Port == 21000"))
    assert [e["Service"]["ID"] for e in entries] == ["web-2-sidecar-proxy"]

    checks = ok(get(client, "/v1/health/checks/web", 'Status != "passing"'))
    assert [c["CheckID"] for c in checks] == ["web-2-up"]

    # Consul's own example: the service checks of a node.
    checks = ok(get(client, "/v1/health/node/n1", 'ServiceName != ""'))
    assert [c["CheckID"] for c in checks] == ["web-1-up"]

    checks = ok(get(client, "/v1/health/state/any", 'ServiceName == "" and Node matches "^n"'))
    assert [c["CheckID"] for c in checks] == ["disk"]
    checks = ok(get(client, "/v1/health/state/critical", 'ServiceName == "web"'))
    assert [c["CheckID"] for c in checks] == ["web-2-up"]


def test_agent_endpoints(client):
    # Consul's documented example: services whose Meta.env is qa.
    for i, env in enumerate(("production", "production", "qa"), start=1):
        register(
            client,
            {
                "ID": f"redis{i}",
                "Name": "redis",
                "Port": 1233 + i,
                "Tags": ["primary" if i != 2 else "secondary"],
                "Meta": {"env": env},
                "Check": {"CheckID": f"redis{i}-ttl", "TTL": "30s", "Status": "passing"},
            },
        )
    assert set(ok(get(client, "/v1/agent/services", 'Meta.env == "qa"'))) == {"redis3"}
    assert set(ok(get(client, "/v1/agent/services", '"primary" in Tags and Port != 1236'))) == {
        "redis1"
    }
    r = put_json(client, "/v1/agent/check/fail/redis2-ttl", "")
    assert r.status_code == 200
    assert set(ok(get(client, "/v1/agent/checks", 'Status == "critical"'))) == {"redis2-ttl"}
    assert set(ok(get(client, "/v1/agent/checks", 'ServiceID matches "^redis[13]$"'))) == {
        "redis1-ttl",
        "redis3-ttl",
    }
    members = ok(get(client, "/v1/agent/members", f'Name == "{NODE}" and Tags.role == consul'))
    assert [m["Name"] for m in members] == [NODE]
    assert ok(get(client, "/v1/agent/members", "Status != 1")) == []


def test_intentions_list(client):
    for src, dst, action in (
        ("web", "db", "allow"),
        ("api", "db", "deny"),
        ("web", "cache", "allow"),
    ):
        r = put_json(
            client,
            f"/v1/connect/intentions/exact?source={src}&destination={dst}",
            {"Action": action},
        )
        assert r.status_code == 200, r.get_data(as_text=True)
    rows = ok(get(client, "/v1/connect/intentions", 'SourceName == "web"'))
    assert sorted((i["SourceName"], i["DestinationName"]) for i in rows) == [
        ("web", "cache"),
        ("web", "db"),
    ]
    rows = ok(get(client, "/v1/connect/intentions", "Action == deny or Precedence != 9"))
    assert [(i["SourceName"], i["DestinationName"]) for i in rows] == [("api", "db")]


# -- blocking queries ----------------------------------------------------------------------------


def test_a_blocking_query_with_a_filter_keeps_index_semantics(client):
    """As in Consul, the filter applies to the answer, not to what wakes the query: a change
    the filter excludes still returns (with the new index and the same filtered answer)."""
    _catalog(client)
    url = "/v1/catalog/service/web?filter=" + quote('ServiceMeta.env == "qa"')
    first = client.get(url)
    idx = index_of(first)
    q = InThread(lambda: client.get(f"{url}&index={idx}&wait=30s")).start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done(), q.result().get_data(as_text=True)
    catalog_register(
        client,
        {
            "Node": "n3",
            "Address": "192.0.2.3",
            "Service": {"ID": "web-3", "Service": "web", "Meta": {"env": "prod"}},
        },
    )
    r = q.result(timeout=15)
    assert r.status_code == 200
    assert index_of(r) > idx
    assert [i["ServiceID"] for i in r.get_json()] == ["web-2"]  # web-3 filtered out


def test_a_bad_filter_on_a_blocking_query_is_answered_at_once(client):
    _catalog(client)
    idx = index_of(client.get("/v1/health/service/web"))
    url = f"/v1/health/service/web?index={idx}&wait=10m&filter=" + quote("Checks.Nope == 1")
    q = InThread(lambda: client.get(url)).start()
    # It never parks: the expression is read before the query blocks.
    assert_error(q.result(timeout=15), 400, "bad_request", "unknown selector 'Checks.Nope'")
