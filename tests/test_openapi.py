"""The API contract: openapi.yaml is valid, complete, served, and every response matches it.

The checking itself lives in ``tests.openapi_check``; the ``app_client`` fixture applies it to
every in-process API test. This file proves that the contract is the app's (same routes, both
ways), that the checker can fail, and walks every endpoint once so that every response schema
is exercised.
"""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, Response
from openapi_spec_validator import OpenAPIV31SpecValidator
from werkzeug.routing import PathConverter

from tests import jwt_support, openapi_check
from tests.openapi_check import (
    SPEC_PATH,
    ValidatingClient,
    httpx_event_hook,
    schema_problems,
    spec_dict,
    spec_operations,
    validate,
)


def make_app(tmp_path, **settings):
    from trellis.api.app import create_app
    from trellis.api.settings import Settings, validate

    s = validate(Settings(data_dir=str(tmp_path), node_name="test-node", **settings))
    return create_app(s, background=False)


def flask_operations(app: Flask) -> tuple[set[tuple[str, str]], dict[str, set[str]]]:
    """The app's (METHOD, OpenAPI path) pairs, and per path the parameters that take '/'."""
    ops: set[tuple[str, str]] = set()
    greedy: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>", r"{\1}", rule.rule)
        # isinstance: the K/V key's converter is a PathConverter subclass (api/views/kv.py).
        greedy[path] = {
            name for name, conv in rule._converters.items() if isinstance(conv, PathConverter)
        }
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                ops.add((method, path))
    return ops, greedy


# -- the document ---------------------------------------------------------------------------------


def test_spec_is_a_valid_openapi_31_document():
    spec = spec_dict()
    assert spec["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(spec).validate()


def test_the_package_ships_the_same_file():
    from trellis.api.app import SPEC_PATH as SERVED

    assert SERVED.resolve() == SPEC_PATH.resolve()


def test_operation_ids_are_unique():
    ids = [
        op["operationId"]
        for item in spec_dict()["paths"].values()
        for m, op in item.items()
        if m in openapi_check.HTTP_METHODS
    ]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_spec_and_app_have_exactly_the_same_routes(tmp_path):
    app = make_app(tmp_path)
    try:
        in_app, greedy = flask_operations(app)
    finally:
        app.extensions["trellis"].close()
    in_spec = spec_operations()
    missing = sorted(in_app - in_spec)
    extra = sorted(in_spec - in_app)
    assert not missing, f"routes the app serves but openapi.yaml does not describe: {missing}"
    assert not extra, f"operations in openapi.yaml that the app does not serve: {extra}"
    # A Flask <path:x> parameter takes slashes; the spec must say so (x-trellis-greedy), and
    # nothing else may claim to.
    for path in {p for _, p in in_spec}:
        assert openapi_check.greedy_params(path) == greedy[path], path


def test_the_kv_key_may_contain_slashes():
    assert openapi_check.resolve("GET", "/v1/kv/a/b/c")[:2] == ("/v1/kv/{key}", {"key": "a/b/c"})
    assert openapi_check.resolve("GET", "/v1/kv/")[0] == "/v1/kv/"
    assert openapi_check.resolve("PUT", "/v1/agent/service/register")[0] == (
        "/v1/agent/service/register"
    )
    assert openapi_check.resolve("GET", "/v1/agent/service/register")[0] == (
        "/v1/agent/service/{service_id}"
    )
    assert openapi_check.resolve("GET", "/v1/catalog/service/a/b") == (None, {}, set())
    assert openapi_check.resolve("POST", "/v1/status/leader")[::2] == (None, {"GET"})


def test_the_server_serves_the_spec_byte_for_byte(app_client):
    resp = app_client.get("/v1/openapi.yaml")
    assert resp.status_code == 200
    assert resp.mimetype == "application/yaml"
    assert resp.data == SPEC_PATH.read_bytes()


# -- request bodies: both spellings of a registration fit the spec, and the server takes them ----

PASCAL = {
    "Name": "web",
    "ID": "web-1",
    "Port": 8080,
    "Tags": ["v1"],
    "Meta": {"team": "edge"},
    "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 8080}},
    "Weights": {"Passing": 3, "Warning": 1},
    "Check": {"CheckID": "web-ttl", "Name": "ttl", "TTL": "30s"},
    "Checks": [{"Name": "http", "HTTP": "http://127.0.0.1:8080/health", "Interval": "10s"}],
    "Connect": {"SidecarService": {"Proxy": {"Upstreams": [{"DestinationName": "db"}]}}},
}
DESIGN_FLOW_2 = {"service": {"name": "web", "port": 8080, "connect": {"proxy": {}}}}
DESIGN_FLOW_3 = {
    "service": {
        "name": "web",
        "port": 8080,
        "connect": {
            "proxy": {
                "config": {"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}
            }
        },
    }
}
BARE_SNAKE = {"name": "api", "port": 9000, "tags": ["x"], "check": {"ttl": "10s"}}


@pytest.mark.parametrize(
    "body", [PASCAL, DESIGN_FLOW_2, DESIGN_FLOW_3, BARE_SNAKE, {"Service": PASCAL}]
)
def test_both_registration_forms_fit_the_spec_and_are_accepted(app_client, body):
    assert schema_problems("ServiceRegistrationBody", body) == []
    assert app_client.put("/v1/agent/service/register", json=body).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"Name": "web", "Port": "8080"},
        {"Name": "web", "Tags": "v1"},
        {"Name": "web", "Check": {"TTL": 30}},
        {"Port": 8080},
    ],
)
def test_wrongly_typed_registrations_fail_the_spec_and_the_server(app_client, body):
    assert schema_problems("ServiceRegistrationBody", body) != []
    resp = app_client.put("/v1/agent/service/register", json=body)
    assert resp.status_code == 400, resp.data


# -- the checker can fail -------------------------------------------------------------------------

INDEX_HEADERS = {
    "X-Consul-Index": "7",
    "X-Consul-KnownLeader": "true",
    "X-Consul-LastContact": "0",
}
GOOD_ENTRY = {
    "LockIndex": 0,
    "Key": "a/b",
    "Flags": 0,
    "Value": base64.b64encode(b"v").decode(),
    "Session": None,
    "CreateIndex": 7,
    "ModifyIndex": 7,
}


def check_kv(body, *, status=200, headers=INDEX_HEADERS, ctype="application/json", qs=""):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return validate("GET", "/v1/kv/a/b", qs, status, headers, data, ctype)


def test_a_conforming_response_passes():
    assert check_kv([GOOD_ENTRY]) == "/v1/kv/{key}"
    assert check_kv(["a/", "b"], qs="keys") == "/v1/kv/{key}"
    assert check_kv(b"\x00\xff raw", ctype="application/octet-stream", qs="raw")
    assert check_kv(b"", ctype="application/octet-stream", qs="raw")


@pytest.mark.parametrize(
    ("why", "kwargs", "expect"),
    [
        ("a field of the wrong type", {"body": [{**GOOD_ENTRY, "Flags": "0"}]}, "Flags"),
        ("a missing field", {"body": [{k: v for k, v in GOOD_ENTRY.items() if k != "Key"}]}, "Key"),
        ("an undocumented field", {"body": [{**GOOD_ENTRY, "Extra": 1}]}, "Extra"),
        ("a value that is not base64", {"body": [{**GOOD_ENTRY, "Value": "no!"}]}, "Value"),
        (
            "a missing blocking header",
            {"body": [GOOD_ENTRY], "headers": {"X-Consul-KnownLeader": "true"}},
            "X-Consul-Index",
        ),
        (
            "a non-numeric index",
            {"body": [GOOD_ENTRY], "headers": {**INDEX_HEADERS, "X-Consul-Index": "x"}},
            "X-Consul-Index",
        ),
        ("an undocumented status", {"body": [GOOD_ENTRY], "status": 418}, "418"),
        ("a wrong content type", {"body": b"[]", "ctype": "text/plain"}, "text/plain"),
        ("an empty JSON body", {"body": b""}, "empty"),
        ("a body that is not JSON", {"body": b"{nope"}, "JSON"),
        (
            "an error without its code",
            {"body": {"error": "x", "status": 400}, "status": 400},
            "code",
        ),
        (
            "an error whose status disagrees",
            {"body": {"error": "x", "code": "bad_request", "status": 404}, "status": 400},
            "400",
        ),
    ],
)
def test_the_checker_catches(why, kwargs, expect):
    body = kwargs.pop("body")
    with pytest.raises(AssertionError, match=re.escape(expect)) as e:
        check_kv(body, **kwargs)
    assert "does not match openapi.yaml" in str(e.value), why


def test_the_checker_catches_unknown_routes_and_methods():
    err = json.dumps({"error": "x", "code": "not_found", "status": 404}).encode()
    assert validate("GET", "/v1/nope", "", 404, {}, err, "application/json") is None
    with pytest.raises(AssertionError, match="no path in the spec"):
        validate("GET", "/v1/nope", "", 200, {}, b"[]", "application/json")
    bad = json.dumps({"error": "x"}).encode()
    with pytest.raises(AssertionError, match="code"):
        validate("GET", "/v1/nope", "", 404, {}, bad, "application/json")
    e405 = json.dumps({"error": "x", "code": "method_not_allowed", "status": 405}).encode()
    validate("POST", "/v1/status/leader", "", 405, {"Allow": "GET"}, e405, "application/json")
    with pytest.raises(AssertionError, match="Allow"):
        validate("POST", "/v1/status/leader", "", 405, {}, e405, "application/json")
    with pytest.raises(AssertionError, match="no POST"):
        validate("POST", "/v1/status/leader", "", 200, {}, b'"x"', "application/json")


def broken_app() -> Flask:
    """A stand-in server that gets one endpoint's contract wrong (Port as a string)."""
    app = Flask("broken")

    @app.get("/v1/agent/services")
    def services():
        body = {"web": {"ID": "web", "Service": "web", "Port": "8080"}}
        return Response(
            json.dumps(body), mimetype="application/json", headers={"X-Consul-ContentHash": "ab"}
        )

    @app.get("/v1/status/leader")
    def leader():
        return Response('"127.0.0.1:8300"', mimetype="application/json")

    return app


def test_the_validating_client_fails_a_test_on_a_bad_response():
    client = ValidatingClient(broken_app().test_client())
    assert client.get("/v1/status/leader").status_code == 200
    with pytest.raises(AssertionError, match=r"(?s)GET /v1/agent/services -> 200.*Port"):
        client.get("/v1/agent/services")
    assert client.raw.get("/v1/agent/services").status_code == 200  # the unchecked client


def test_the_httpx_hook_checks_a_real_wsgi_server(tmp_path):
    app = make_app(tmp_path)
    try:
        with httpx.Client(
            transport=httpx.WSGITransport(app=app),
            base_url="http://trellis",
            event_hooks={"response": [httpx_event_hook]},
        ) as client:
            assert client.put("/v1/kv/a/b", content=b"v").json() is True
            assert client.get("/v1/kv/a/b").json()[0]["Key"] == "a/b"
            with client.stream("GET", "/v1/kv/a/b", params={"raw": ""}) as resp:
                assert resp.read() == b"v"
            assert client.get("/v1/kv/missing").status_code == 404
    finally:
        app.extensions["trellis"].close()
    with (
        httpx.Client(
            transport=httpx.WSGITransport(app=broken_app()),
            base_url="http://trellis",
            event_hooks={"response": [httpx_event_hook]},
        ) as client,
        pytest.raises(AssertionError, match="Port"),
    ):
        client.get("/v1/agent/services")


# -- the smoke walk: every operation, every response shape ---------------------------------------


def ok(resp, status=200):
    assert resp.status_code == status, (resp.status_code, resp.data)
    return resp


def service_csr(trust_domain: str, service: str) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    from trellis.proxy import spiffe
    from trellis.proxy import x509 as px

    ident = spiffe.service_id(trust_domain, "dc1", service)
    return px.build_csr(px.generate_key(), ident).public_bytes(Encoding.PEM).decode()


def test_smoke_walk_every_endpoint(app_client):
    c = app_client
    some_token = "00000000-0000-4000-8000-00000000000a"

    # ---- writes: services in both spellings, checks, a node, keys
    ok(c.put("/v1/agent/service/register", json=PASCAL))
    ok(c.put("/v1/agent/service/register?replace-existing-checks", json=DESIGN_FLOW_3))
    ok(c.put("/v1/agent/service/register", json={"name": "api", "connect": {"native": True}}))
    ok(
        c.put(
            "/v1/agent/service/register",
            json={
                "Name": "web-proxy",
                "Kind": "connect-proxy",
                "Port": 21500,
                "Proxy": {
                    "DestinationServiceName": "web",
                    "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
                },
            },
        )
    )
    ok(c.put("/v1/agent/check/register", json={"Name": "disk", "TTL": "1m"}))
    snake_check = {"name": "web-x", "service_id": "web-1", "ttl": "1m"}
    ok(c.put("/v1/agent/check/register", json=snake_check))
    ok(c.put("/v1/agent/check/pass/disk?note=fine"))
    ok(c.put("/v1/agent/check/warn/disk"))
    ok(c.put("/v1/agent/check/fail/disk", query_string={"note": "full"}))
    ok(c.put("/v1/agent/check/update/web-x", json={"Status": "warning", "Output": "slow"}))
    ok(c.put("/v1/agent/check/update/web-ttl"))
    ok(
        c.put(
            "/v1/catalog/register",
            json={
                "Node": "ext-1",
                "Address": "10.0.0.5",
                "NodeMeta": {"rack": "r1"},
                "TaggedAddresses": {"wan": "198.51.100.5"},
                "Service": {"Service": "ext", "Port": 80, "Tags": ["v1"]},
                "Checks": [
                    {"CheckID": "ext-up", "Name": "up", "Status": "passing", "ServiceID": "ext"},
                    {"CheckID": "ext-node", "Name": "node", "Status": "passing"},
                ],
            },
        )
    )
    ok(c.put("/v1/kv/config/web/port?flags=42", data=b"8080"))
    ok(c.put("/v1/kv/config/web/name", data="web"))
    ok(c.put("/v1/kv/config/db/blob", data=b"\x00\xff\xfe"))
    ok(c.put("/v1/kv/empty", data=b""))
    assert ok(c.put("/v1/kv/config/web/port?cas=0", data=b"1")).json is False
    entry = ok(c.get("/v1/kv/config/web/port")).json[0]
    assert entry["Flags"] == 42
    assert ok(c.put(f"/v1/kv/config/web/port?cas={entry['ModifyIndex']}", data=b"81")).json

    # ---- every GET
    ok(c.get("/v1/kv/config/web/port"))
    assert ok(c.get("/v1/kv/config/web/port?raw")).data == b"81"
    ok(c.head("/v1/kv/config/web/port"))
    assert ok(c.get("/v1/kv/empty?raw")).data == b""
    assert ok(c.get("/v1/kv/config/db/blob?raw=true")).data == b"\x00\xff\xfe"
    ok(c.get("/v1/kv/config/?recurse&pretty"))
    assert ok(c.get("/v1/kv/config/?keys&separator=/")).json == ["config/db/", "config/web/"]
    ok(c.get("/v1/kv/?recurse"))
    ok(c.get("/v1/kv/?keys"))
    idx = ok(c.get("/v1/catalog/services")).headers["X-Consul-Index"]
    ok(c.get(f"/v1/catalog/services?index={idx}&wait=10ms&dc=dc1"))
    ok(c.get("/v1/catalog/datacenters"))
    ok(c.get("/v1/catalog/nodes"))
    assert len(ok(c.get("/v1/catalog/service/web?tag=v1")).json) == 1
    assert ok(c.get("/v1/catalog/connect/web")).json
    assert ok(c.get("/v1/catalog/connect/api")).json
    assert ok(c.get("/v1/catalog/node/test-node")).json["Services"]
    assert ok(c.get("/v1/catalog/node/nobody")).json is None
    assert ok(c.get("/v1/catalog/node-services/test-node")).json["Services"]
    assert ok(c.get("/v1/catalog/node-services/nobody")).json == {"Node": None, "Services": []}
    assert ok(c.get("/v1/catalog/gateway-services/gw?index=1&wait=1ms")).json == []
    assert ok(c.get("/v1/health/ingress/web?passing")).json == []
    # ---- config entries: a write, a list and a read (index headers), a 404, deletes
    entry = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
    assert ok(c.put("/v1/config?cas=0", json=entry)).json is True
    assert ok(c.get("/v1/config/service-defaults?index=1&wait=1ms")).json[0]["Name"] == "web"
    assert ok(c.get("/v1/config/service-defaults/web")).json["Protocol"] == "http"
    ok(c.get("/v1/config/proxy-defaults/global"), 404)
    assert ok(c.delete("/v1/config/service-defaults/web?cas=1")).json is False
    assert ok(c.delete("/v1/config/service-defaults/web")).json == {}
    ok(c.get("/v1/health/service/web?pretty"))
    ok(c.get("/v1/health/service/ext?passing&tag=v1"))
    ok(c.get("/v1/health/connect/web"))
    ok(c.get("/v1/health/checks/web"))
    ok(c.get("/v1/health/node/ext-1"))
    for state in ("any", "passing", "warning", "critical"):
        ok(c.get(f"/v1/health/state/{state}"))
    services = ok(c.get("/v1/agent/services"))
    h = services.headers["X-Consul-ContentHash"]
    ok(c.get(f"/v1/agent/services?hash={h}&wait=10ms"))
    assert set(services.json) >= {"web-1", "web-1-sidecar-proxy", "web", "api", "web-proxy"}
    assert ok(c.get("/v1/agent/service/web-1-sidecar-proxy")).json["Kind"] == "connect-proxy"
    ok(c.get("/v1/agent/service/web-1?hash=x&wait=10ms"))
    ok(c.get("/v1/agent/checks"))
    ok(c.get("/v1/agent/self"))
    ok(c.get("/v1/agent/members"))
    ok(c.get("/v1/status/leader"))
    ok(c.get("/v1/status/peers"))
    ok(c.get("/v1/openapi.yaml"))

    # ---- the Connect CA
    roots = ok(c.get("/v1/connect/ca/roots")).json
    ok(c.get("/v1/agent/connect/ca/roots?index=1&wait=10ms"))
    pem = ok(c.get("/v1/connect/ca/roots?pem=true"))
    assert pem.mimetype == "application/pem-certificate-chain"
    ok(c.get("/v1/connect/ca/configuration"))
    ttl_only = {"Provider": "consul", "Config": {"LeafCertTTL": "24h"}}
    assert ok(c.put("/v1/connect/ca/configuration", json=ttl_only)).json is True
    ok(c.post("/v1/connect/ca/sign", json={"CSR": service_csr(roots["TrustDomain"], "web")}))
    ok(c.get("/v1/agent/connect/ca/leaf/web"))
    assert len(ok(c.post("/v1/connect/ca/rotate")).json["Roots"]) == 2

    # ---- intentions and authorization
    web_db = {"SourceName": "web", "DestinationName": "db", "Action": "allow", "Meta": {"a": "b"}}
    ixn_id = ok(c.post("/v1/connect/intentions", json=web_db)).json["ID"]
    ok(c.post("/v1/connect/intentions", json={**web_db, "SourceName": "*"}))
    ok(c.post("/v1/connect/intentions", json=web_db), 409)
    idx = ok(c.get("/v1/connect/intentions")).headers["X-Consul-Index"]
    assert len(ok(c.get(f"/v1/connect/intentions?index={idx}&wait=10ms")).json) == 2
    assert ok(c.get(f"/v1/connect/intentions/{ixn_id}")).json["Precedence"] == 9
    assert ok(c.put(f"/v1/connect/intentions/{ixn_id}", json={**web_db, "Action": "deny"})).json
    ok(c.put(f"/v1/connect/intentions/{ixn_id}", json={**web_db, "SourceName": "*"}), 409)
    assert ok(c.put("/v1/connect/intentions/exact?source=api&destination=*", json=web_db)).json
    exact = ok(c.get("/v1/connect/intentions/exact?source=api&destination=*"))
    ok(c.get(f"/v1/connect/intentions/exact?source=api&destination=*&index={idx}&wait=10ms"))
    assert exact.json["Precedence"] == 6
    ok(c.get("/v1/connect/intentions/exact?source=x&destination=y&index=1&wait=10ms"), 404)
    match = ok(c.get("/v1/connect/intentions/match?by=source&name=web&name=api&index=1&wait=1ms"))
    assert [len(match.json[n]) for n in ("web", "api")] == [2, 2]
    ok(c.get("/v1/connect/intentions/match?by=destination&name=db"))
    assert ok(c.get("/v1/connect/intentions/check?source=web&destination=db")).json == {
        "Allowed": False
    }
    uri = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/web"
    auth = ok(c.post("/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": uri}))
    assert auth.json == {"Authorized": False, "Reason": "Matched intention: web => db (deny)"}
    assert ok(c.delete(f"/v1/connect/intentions/{ixn_id}")).json is True
    assert ok(c.delete("/v1/connect/intentions/exact?source=api&destination=*")).json is True
    ok(c.get(f"/v1/connect/intentions/{ixn_id}"), 404)
    ok(c.delete(f"/v1/connect/intentions/{ixn_id}"), 404)
    ok(c.get("/v1/connect/intentions/not-a-uuid"), 400)
    ok(c.post("/v1/connect/intentions", json={**web_db, "SourceName": "web*"}), 400)
    ok(c.get("/v1/connect/intentions/match?by=sideways&name=db"), 400)
    ok(c.post("/v1/agent/connect/authorize", json={"Target": "*", "ClientCertURI": uri}), 400)

    # ---- deletes and deregistrations
    assert ok(c.delete("/v1/kv/config/web/name?cas=1")).json is False
    assert ok(c.delete("/v1/kv/config/web/name")).json is True
    assert ok(c.delete("/v1/kv/config/?recurse")).json is True
    assert ok(c.delete("/v1/kv/?recurse")).json is True  # the whole key space
    assert ok(c.get("/v1/kv/?keys"), 404)
    ok(c.put("/v1/catalog/deregister", json={"Node": "ext-1", "CheckID": "ext-node"}))
    ok(c.put("/v1/catalog/deregister", json={"Node": "ext-1", "ServiceID": "ext"}))
    ok(c.put("/v1/catalog/deregister", json={"node": "ext-1"}))
    ok(c.put("/v1/agent/check/deregister/disk"))
    ok(c.put("/v1/agent/service/deregister/web-proxy"))

    # ---- errors
    ok(c.get("/v1/kv/"), 400)  # the empty key needs recurse or keys
    ok(c.put("/v1/kv/", data=b"x"), 400)
    ok(c.delete("/v1/kv/"), 400)
    ok(c.put("/v1/kv/k?flags=-1", data=b"x"), 400)
    ok(c.put("/v1/kv/k?acquire=abc", data=b"x"), 400)
    ok(c.get("/v1/kv/a/../b"), 301)  # to the clean path, as Consul
    ok(c.put("/v1/kv/a/../b", data=b"x"), 400)
    ok(c.get("/v1/kv/k?recurse=false"), 400)
    ok(c.get("/v1/catalog/services?dc=elsewhere"), 400)
    ok(c.get("/v1/catalog/nodes?index=soon"), 400)
    ok(c.get("/v1/health/service/web?index=1&wait=forever"), 400)
    ok(c.get("/v1/health/state/sideways"), 400)
    ok(c.put("/v1/agent/service/register", data=b"{not json"), 400)
    ok(c.put("/v1/agent/service/register", json={"Name": "web", "Colour": "red"}), 400)
    ok(c.put("/v1/agent/check/update/web-x", json={"Status": "fine"}), 400)
    ok(c.put("/v1/catalog/register", json={"Node": "n"}), 400)
    ok(c.put("/v1/catalog/deregister", json={}), 400)
    ok(c.get("/v1/kv/missing"), 404)
    ok(c.get("/v1/kv/missing?recurse"), 404)
    ok(c.get("/v1/no/such/endpoint"), 404)
    ok(c.get("/v1/agent/service/nothing"), 404)
    ok(c.put("/v1/agent/service/deregister/nothing"), 404)
    ok(c.put("/v1/agent/check/pass/nothing"), 404)
    ok(c.put("/v1/agent/check/deregister/nothing"), 404)
    ok(c.put("/v1/agent/check/register", json={"Name": "x", "ServiceID": "nothing"}), 404)
    ok(c.post("/v1/status/leader"), 405)
    ok(c.delete("/v1/catalog/services"), 405)
    ok(c.post("/v1/kv/k"), 405)
    ok(c.put("/v1/kv/big", data=b"x" * (512 * 1024 + 1)), 413)
    ok(c.put("/v1/agent/service/register", data=b"x" * (2 * 1024 * 1024)), 413)
    ok(c.put("/v1/agent/service/register", data={"Name": "web"}), 400)  # a form is not JSON
    ok(c.post("/v1/connect/ca/sign", json={"CSR": "not a CSR"}), 400)
    ok(c.put("/v1/connect/ca/configuration", json={"Provider": "nope"}), 400)
    ok(c.get("/v1/agent/connect/ca/leaf/-web"), 400)
    ok(c.options("/v1/kv/k"))  # answered by Flask itself; not checked

    # ---- sessions and locks
    r = c.put("/v1/session/create", json={"Name": "walk", "TTL": "30s", "Behavior": "delete"})
    ok(r)
    sid = r.get_json()["ID"]
    ok(c.put(f"/v1/kv/walk-lock?acquire={sid}", data=b"held"))
    ok(c.get(f"/v1/session/info/{sid}"))
    ok(c.get("/v1/session/node/test-node"))
    ok(c.get("/v1/session/list"))
    ok(c.put(f"/v1/session/renew/{sid}"))
    ok(c.put(f"/v1/kv/walk-lock?release={sid}", data=b"free"))
    ok(c.put(f"/v1/session/destroy/{sid}"))
    ok(c.put(f"/v1/session/renew/{sid}"), 404)
    ok(c.put("/v1/session/create", json={"TTL": "1s"}), 400)

    # ---- prepared queries, coordinates (there are none), the Raft configuration
    walk_q = {"Name": "walk-q", "Service": {"Service": "web", "Tags": ["!old"]}}
    qid = ok(c.post("/v1/query", json=walk_q)).json["ID"]
    ok(c.get("/v1/query"))
    ok(c.get(f"/v1/query/{qid}?index=1&wait=1ms"))
    ok(c.put(f"/v1/query/{qid}", json={**walk_q, "DNS": {"TTL": "5s"}}))
    ok(c.get("/v1/query/walk-q/execute?limit=1"))
    ok(c.get("/v1/query/walk-q/explain"))
    ok(c.delete(f"/v1/query/{qid}"))
    ok(c.get(f"/v1/query/{qid}"), 404)
    ok(c.get("/v1/query/walk-q/execute"), 404)
    ok(c.post("/v1/query", json={"Name": "no-service"}), 400)
    ok(c.get("/v1/coordinate/datacenters"))
    ok(c.get("/v1/coordinate/nodes?index=1&wait=1ms"))
    ok(c.get("/v1/coordinate/node/test-node"), 404)
    ok(c.put("/v1/coordinate/update", json={"Node": "test-node"}), 400)
    ok(c.get("/v1/operator/raft/configuration"))

    # ---- transactions: a write, a read (index headers), a failed check (409), too many (413)
    kv_set = {"KV": {"Verb": "set", "Key": "walk-txn", "Value": "dHhu"}}
    ok(c.put("/v1/txn", json=[kv_set, {"Node": {"Verb": "set", "Node": {"Node": "walk-n"}}}]))
    ok(c.put("/v1/txn", json=[{"KV": {"Verb": "get-tree", "Key": "walk-"}}]))
    ok(c.put("/v1/txn", json=[{"KV": {"Verb": "check-index", "Key": "walk-txn", "Index": 1}}]), 409)
    ok(c.put("/v1/txn", json=[kv_set] * 129), 413)

    # ---- maintenance mode and user events
    ok(c.put("/v1/agent/maintenance?enable=true&reason=walk"))
    ok(c.put("/v1/agent/maintenance?enable=false"))
    ok(c.put("/v1/agent/maintenance"), 400)
    ok(c.put("/v1/agent/service/maintenance/web-1?enable=true"))
    ok(c.put("/v1/agent/service/maintenance/web-1?enable=false"))
    ok(c.put("/v1/agent/service/maintenance/nothing?enable=true"), 404)
    ok(c.put("/v1/event/fire/walk?service=web&tag=v1", data=b"payload"))
    ok(c.put("/v1/event/fire/walk-empty"))
    ok(c.put("/v1/event/fire/_reserved"), 400)
    ok(c.put("/v1/event/fire/walk", data=b"x" * (64 * 1024 + 1)), 413)
    ok(c.get("/v1/event/list?name=walk"))
    ok(c.get("/v1/event/list?name=nothing&index=1&wait=1ms"))
    # ---- snapshots: save, restore what was saved, a truncated archive (400)
    snap = c.get("/v1/snapshot")
    ok(snap)
    ok(c.put("/v1/snapshot", data=snap.data))
    ok(c.put("/v1/snapshot", data=snap.data[:100]), 400)
    # ---- the agent itself and the operator reads
    ok(c.get("/v1/agent/version"))
    ok(c.get("/v1/agent/host"))
    ok(c.get("/v1/agent/metrics"))
    ok(c.get("/v1/agent/metrics?format=prometheus"))
    ok(c.get("/v1/agent/metrics?format=xml"), 400)
    ok(c.get("/v1/agent/monitor?loglevel=loud"), 400)
    ok(c.put("/v1/agent/reload"))
    ok(c.put("/v1/agent/token/dns", json={"Token": some_token}))
    ok(c.put("/v1/agent/token/nothing", json={"Token": some_token}), 404)
    ok(c.get("/v1/operator/usage"))
    ok(c.get("/v1/operator/autopilot/configuration"))
    ok(c.put("/v1/operator/autopilot/configuration", json={}), 400)
    ok(c.get("/v1/operator/autopilot/health"))
    ok(c.get("/v1/operator/autopilot/state"))

    # ---- ACL endpoints: this app has ACLs off, so every one answers 401
    some = "00000000-0000-4000-8000-000000000000"
    for method, url in ACL_CALLS:
        ok(c.open(url.format(id=some), method=method, json={"Name": "p"}), 401)
    assert {(m, t) for m, t, s in c.seen if s == 401} == acl_operations()

    # ---- every other operation of the spec answered 2xx at least once, every GET 200 (the
    #      ACL operations: test_smoke_walk_acls)
    seen_ok = {(m, t) for m, t, s in c.seen if 200 <= s < 300}
    not_exercised = sorted(spec_operations() - acl_operations() - seen_ok)
    # Always 400 (a key name is required; Trellis keeps no coordinates) or 404 (no node
    # has coordinates).
    never_ok = {
        ("PUT", "/v1/kv/"),
        ("PUT", "/v1/coordinate/update"),
        ("GET", "/v1/coordinate/node/{node}"),
        # Trellis has no autopilot to configure (400); the monitor streams until the client
        # goes, which an in-process client never does (tests/test_api_agent_operator.py
        # streams it from a real server).
        ("PUT", "/v1/operator/autopilot/configuration"),
        ("GET", "/v1/agent/monitor"),
    }
    assert set(not_exercised) <= never_ok, not_exercised
    gets = {("GET", t) for m, t in spec_operations() - acl_operations() if m == "GET"}
    assert gets - never_ok <= {(m, t) for m, t, s in c.seen if s == 200}
    assert {400, 404, 413} <= {s for _, _, s in c.seen}


#: One request per ACL operation (``{id}``: a policy, role or token ID).
ACL_CALLS = (
    ("PUT", "/v1/acl/bootstrap"),
    ("PUT", "/v1/acl/policy"),
    ("GET", "/v1/acl/policy/{id}"),
    ("PUT", "/v1/acl/policy/{id}"),
    ("DELETE", "/v1/acl/policy/{id}"),
    ("GET", "/v1/acl/policy/name/p"),
    ("GET", "/v1/acl/policies"),
    ("PUT", "/v1/acl/token"),
    ("GET", "/v1/acl/token/self"),
    ("GET", "/v1/acl/token/{id}"),
    ("PUT", "/v1/acl/token/{id}"),
    ("DELETE", "/v1/acl/token/{id}"),
    ("GET", "/v1/acl/tokens"),
    ("PUT", "/v1/acl/token/{id}/clone"),
    ("PUT", "/v1/acl/role"),
    ("GET", "/v1/acl/role/{id}"),
    ("PUT", "/v1/acl/role/{id}"),
    ("DELETE", "/v1/acl/role/{id}"),
    ("GET", "/v1/acl/role/name/p"),
    ("GET", "/v1/acl/roles"),
    ("GET", "/v1/acl/templated-policies"),
    ("GET", "/v1/acl/templated-policy/name/builtin/dns"),
    ("POST", "/v1/acl/templated-policy/preview/builtin/dns"),
    ("PUT", "/v1/acl/auth-method"),
    ("GET", "/v1/acl/auth-method/{id}"),
    ("PUT", "/v1/acl/auth-method/{id}"),
    ("DELETE", "/v1/acl/auth-method/{id}"),
    ("GET", "/v1/acl/auth-methods"),
    ("PUT", "/v1/acl/binding-rule"),
    ("GET", "/v1/acl/binding-rule/{id}"),
    ("PUT", "/v1/acl/binding-rule/{id}"),
    ("DELETE", "/v1/acl/binding-rule/{id}"),
    ("GET", "/v1/acl/binding-rules"),
    ("POST", "/v1/acl/login"),
    ("PUT", "/v1/acl/login"),
    ("POST", "/v1/acl/logout"),
    ("PUT", "/v1/acl/logout"),
    ("POST", "/v1/internal/acl/authorize"),
)


def acl_operations() -> set[tuple[str, str]]:
    return {(m, t) for m, t in spec_operations() if t.startswith(("/v1/acl/", "/v1/internal/acl/"))}


def test_smoke_walk_acls(tmp_path):
    """The ACL operations, on an app with ACLs on (default deny): each answers 2xx once, each
    GET 200, and the errors they list (400, 403, 404, 409) are met."""
    app = make_app(tmp_path, acl_enabled=True, acl_default_policy="deny")
    c = ValidatingClient(app.test_client())
    try:
        ok(c.get("/v1/acl/token/self"))  # the anonymous token, before any bootstrap
        ok(c.get("/v1/acl/tokens"), 403)
        boot = ok(c.put("/v1/acl/bootstrap")).json
        ok(c.put("/v1/acl/bootstrap"), 403)
        h = {"X-Consul-Token": boot["SecretID"]}
        ask = [{"Resource": "operator", "Access": "write"}]
        got = ok(c.post("/v1/internal/acl/authorize", json=ask, headers=h)).json
        assert got == [{"Resource": "operator", "Access": "write", "Allow": True}]
        ok(c.post("/v1/internal/acl/authorize", json=ask), 200)  # the anonymous token
        ok(c.post("/v1/internal/acl/authorize", json=[{"Resource": "x", "Access": "read"}]), 400)
        ok(c.post("/v1/internal/acl/authorize", json=ask * 65, headers=h), 400)
        ok(c.get("/v1/acl/token/self", headers={"X-Consul-Token": "no-such-secret"}), 403)

        rules = 'key_prefix "app/" { policy = "write" }'
        p = ok(c.put("/v1/acl/policy", json={"Name": "app", "Rules": rules}, headers=h)).json
        ok(c.put("/v1/acl/policy", json={"Name": "app"}, headers=h), 409)
        ok(c.put("/v1/acl/policy", json={"Name": "bad", "Rules": "nope {"}, headers=h), 400)
        ok(c.get(f"/v1/acl/policy/{p['ID']}?pretty", headers=h))
        ok(c.get("/v1/acl/policy/name/app", headers=h))
        ok(c.get("/v1/acl/policy/name/nothing", headers=h), 404)
        ok(c.get("/v1/acl/policy/not-a-uuid", headers=h), 400)
        body = {"Name": "app", "Rules": rules, "Description": "app keys", "Datacenters": ["dc1"]}
        ok(c.put(f"/v1/acl/policy/{p['ID']}", json=body, headers=h))
        ok(c.get("/v1/acl/policies", headers=h))

        t = ok(c.put("/v1/acl/token", json={"Policies": [{"Name": "app"}]}, headers=h)).json
        ok(c.put("/v1/acl/token", json={"SecretID": t["SecretID"]}, headers=h), 409)
        ok(c.put("/v1/acl/token", json={"Policies": [{"Name": "nothing"}]}, headers=h), 400)
        ok(c.get("/v1/acl/token/self", headers={"Authorization": f"Bearer {t['SecretID']}"}))
        ok(c.get(f"/v1/acl/token/{t['AccessorID']}", headers=h))
        ok(
            c.get(f"/v1/acl/token/{t['AccessorID']}", headers={"X-Consul-Token": t["SecretID"]}),
            403,
        )
        body = {"Description": "app deployer", "Policies": [{"ID": p["ID"]}]}
        ok(c.put(f"/v1/acl/token/{t['AccessorID']}", json=body, headers=h))
        ok(c.get("/v1/acl/tokens", headers=h))
        # roles, identities, templated policies, clone, expiry
        role_body = {
            "Name": "deployer",
            "Policies": [{"Name": "app"}],
            "ServiceIdentities": [{"ServiceName": "web", "Datacenters": ["dc1"]}],
            "NodeIdentities": [{"NodeName": "node-1", "Datacenter": "dc1"}],
            "TemplatedPolicies": [{"TemplateName": "builtin/dns"}],
        }
        role = ok(c.put("/v1/acl/role", json=role_body, headers=h)).json
        ok(c.put("/v1/acl/role", json=role_body, headers=h), 409)
        ok(c.put("/v1/acl/role", json={"Name": "r", "Policies": [{"Name": "no"}]}, headers=h), 400)
        ok(c.get(f"/v1/acl/role/{role['ID']}", headers=h))
        ok(c.get("/v1/acl/role/name/deployer", headers=h))
        ok(c.get("/v1/acl/role/name/nothing", headers=h), 404)
        ok(c.put(f"/v1/acl/role/{role['ID']}", json={**role_body, "Description": "d"}, headers=h))
        ok(c.get(f"/v1/acl/roles?policy={p['ID']}", headers=h))
        body = {
            "Roles": [{"Name": "deployer"}],
            "ServiceIdentities": [{"ServiceName": "api"}],
            "TemplatedPolicies": [
                {"TemplateName": "builtin/node", "TemplateVariables": {"Name": "n"}}
            ],
            "ExpirationTTL": "1h",
        }
        t2 = ok(c.put("/v1/acl/token", json=body, headers=h)).json
        clone = ok(c.put(f"/v1/acl/token/{t2['AccessorID']}/clone", json={}, headers=h)).json
        ok(c.put(f"/v1/acl/token/{clone['AccessorID']}/clone", headers=h))
        ok(c.get(f"/v1/acl/tokens?role={role['ID']}&servicename=api", headers=h))
        ok(c.get("/v1/acl/templated-policies", headers=h))
        ok(c.get("/v1/acl/templated-policy/name/builtin/service", headers=h))
        ok(c.get("/v1/acl/templated-policy/name/builtin/nothing", headers=h), 404)
        ok(
            c.post(
                "/v1/acl/templated-policy/preview/builtin/service", json={"Name": "api"}, headers=h
            )
        )
        ok(c.post("/v1/acl/templated-policy/preview/builtin/service", json={}, headers=h), 400)
        assert ok(c.delete(f"/v1/acl/role/{role['ID']}", headers=h)).json is True
        ok(c.delete(f"/v1/acl/role/{role['ID']}", headers=h), 404)
        assert ok(c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=h)).json is True
        ok(c.get(f"/v1/acl/token/{t['AccessorID']}", headers=h), 403)  # ACL not found
        ok(c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=h), 404)
        assert ok(c.delete(f"/v1/acl/policy/{p['ID']}", headers=h)).json is True
        ok(c.delete(f"/v1/acl/policy/{p['ID']}", headers=h), 404)
        ok(c.put(f"/v1/acl/policy/{p['ID']}", json={"Name": "x"}, headers=h), 404)
        _walk_logins(c, h)
    finally:
        app.extensions["trellis"].close()

    seen_ok = {(m, t) for m, t, s in c.seen if 200 <= s < 300}
    assert acl_operations() <= seen_ok, sorted(acl_operations() - seen_ok)
    assert {(m, t) for m, t in acl_operations() if m == "GET"} <= {
        (m, t) for m, t, s in c.seen if s == 200
    }
    assert {400, 403, 404, 409} <= {s for m, t, s in c.seen if t.startswith("/v1/acl/")}
    assert len(ACL_CALLS) == len(acl_operations())


def _walk_logins(c, h: dict[str, str]) -> None:
    """Auth methods, binding rules, login and logout (tests/test_acl_login.py in depth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    config = {
        "JWTValidationPubKeys": [jwt_support.pem(key)],
        "JWTSupportedAlgs": ["ES256"],
        "ClaimMappings": {"service": "svc", "env": "env"},
    }
    body = {"Name": "m", "Type": "jwt", "MaxTokenTTL": "10m", "Config": config}
    ok(c.put("/v1/acl/auth-method", json=body, headers=h))
    ok(c.put("/v1/acl/auth-method", json=body, headers=h), 409)
    ok(c.put("/v1/acl/auth-method", json={**body, "Name": "u", "Type": "oidc"}, headers=h), 400)
    ok(c.put("/v1/acl/auth-method/m", json={**body, "Description": "d"}, headers=h))
    ok(c.put("/v1/acl/auth-method/none", json={**body, "Name": "none"}, headers=h), 404)
    ok(c.get("/v1/acl/auth-method/m", headers=h))
    ok(c.get("/v1/acl/auth-methods", headers=h))
    rule = {"AuthMethod": "m", "BindType": "service", "BindName": "${value.svc}"}
    r = ok(c.put("/v1/acl/binding-rule", json={**rule, "Selector": 'value.env == "p"'}, headers=h))
    rid = r.json["ID"]
    ok(c.put(f"/v1/acl/binding-rule/{rid}", json={**rule, "Selector": ""}, headers=h))
    ok(c.get(f"/v1/acl/binding-rule/{rid}", headers=h))
    ok(c.get("/v1/acl/binding-rules?authmethod=m", headers=h))
    jwt = jwt_support.sign(key, {"service": "web", "env": "p"})
    t = ok(c.post("/v1/acl/login", json={"AuthMethod": "m", "BearerToken": jwt})).json
    ok(c.put("/v1/acl/login", json={"AuthMethod": "m", "BearerToken": "x.y.z"}), 403)
    ok(c.post("/v1/acl/logout", headers=h), 403)
    ok(c.post("/v1/acl/logout", headers={"X-Consul-Token": t["SecretID"]}))
    t = ok(c.put("/v1/acl/login", json={"AuthMethod": "m", "BearerToken": jwt})).json
    ok(c.put("/v1/acl/logout", headers={"X-Consul-Token": t["SecretID"]}))
    assert ok(c.delete(f"/v1/acl/binding-rule/{rid}", headers=h)).json is True
    assert ok(c.delete("/v1/acl/auth-method/m", headers=h)).json is True


def test_store_unavailable_is_a_503_in_the_contract(tmp_path):
    app = make_app(tmp_path)
    client = ValidatingClient(app.test_client())
    ok(client.get("/v1/catalog/services"))
    app.extensions["trellis"].close()
    resp = ok(client.get("/v1/catalog/services"), 503)
    assert resp.json["code"] == "store_unavailable"
    ok(client.put("/v1/kv/k", data=b"v"), 503)
    ok(client.get("/v1/agent/services"), 503)
