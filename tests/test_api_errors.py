"""Nothing a client sends yields a 500: malformed, mistyped, oversized and random requests,
in-process, on SQLite and on PostgreSQL.

Every error is JSON ``{"error", "code", "status"}`` with the status a client can act on: 400 for
a malformed request, 404 for an unknown route or object, 405 (with ``Allow``) for a wrong
method, 413 for a body over the limit.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import api_fixtures
from tests.api_fixtures import NODE, assert_error, put_json, register

# Fixtures, bound here so that pytest finds them in this module.
client = api_fixtures.client
make_client = api_fixtures.make_client

MIB = 1024 * 1024
REGISTER = "/v1/agent/service/register"
CATALOG_REGISTER = "/v1/catalog/register"
CATALOG_DEREGISTER = "/v1/catalog/deregister"
CHECK_REGISTER = "/v1/agent/check/register"
CHECK_UPDATE = "/v1/agent/check/update/serfHealth"
JSON_ENDPOINTS = [REGISTER, CATALOG_REGISTER, CATALOG_DEREGISTER, CHECK_REGISTER, CHECK_UPDATE]


def assert_nothing_registered(client) -> None:
    assert client.get("/v1/agent/services").get_json() == {}
    assert [n["Node"] for n in client.get("/v1/catalog/nodes").get_json()] == [NODE]


# -- malformed JSON ----------------------------------------------------------------------------

BAD_JSON = [
    b"{",
    b'{"Name": "w"',
    b"not json",
    b"{'Name': 'w'}",
    b'{"Name": "w",}',
    b'{"Name": "w"} trailing',
    b'{"Name": NaN}',
    b'{"Name": "w", "Meta": {"a": Infinity}}',
    b'{"Name": "w", "Port": -Infinity}',
    # Numbers that become infinity (or cannot be a double): an opaque map kept them, and every
    # later read of the service was "Infinity", which no JSON client parses.
    b'{"Name": "p", "Kind": "connect-proxy",'
    b' "Proxy": {"DestinationServiceName": "d", "Config": {"x": 1e400}}}',
    b'{"Name": "w", "Meta": {"k": "v"}, "Port": -1' + b"0" * 400 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    b'{"Name": "\xff"}',
    b'{"Name": "w", "Meta": {"k": "\xc3\x28"}}',
]


def test_bad_json_is_400(client, subtests):
    for url in JSON_ENDPOINTS:
        for body in BAD_JSON:
            with subtests.test(url=url, body=body[:40]):
                r = client.put(url, data=body, content_type="application/json")
                assert_error(r, 400, "bad_request", "request body")
    assert_nothing_registered(client)


def test_json_that_is_not_an_object_is_400(client, subtests):
    for url in JSON_ENDPOINTS:
        for body in ("[]", '[{"Name": "w"}]', "1", '"w"', "true", "null"):
            if url == CHECK_UPDATE and body == "null":
                continue  # an empty update (no body, or null) means "passing", as in Consul
            with subtests.test(url=url, body=body):
                r = client.put(url, data=body, content_type="application/json")
                assert_error(r, 400, "bad_request", "must be a JSON object")
    with subtests.test("empty body"):
        for url in (REGISTER, CATALOG_REGISTER, CATALOG_DEREGISTER, CHECK_REGISTER):
            assert_error(client.put(url, data=b" \n"), 400, "bad_request", "empty")
    assert_nothing_registered(client)


def test_lone_surrogates_are_400(client, subtests):
    # "\ud800" is valid JSON but not Unicode: it cannot be stored or sent back (it was a 500).
    bodies = [
        (REGISTER, {"Name": "w", "ID": "\ud800"}),
        (REGISTER, {"Name": "w", "Address": "\udfff"}),
        (REGISTER, {"Name": "w", "Tags": ["a\ud800"]}),
        (REGISTER, {"Name": "w", "Meta": {"k": "\ud800"}}),
        (REGISTER, {"Name": "w", "Check": {"CheckID": "\ud800", "TTL": "1s"}}),
        (REGISTER, {"Name": "w", "Kind": "connect-proxy", "Proxy": {"\ud800": 1}}),
        (CATALOG_REGISTER, {"Node": "n", "Address": "\ud800"}),
        (CATALOG_REGISTER, {"Node": "n", "Address": "a", "ID": "\ud800"}),
        (CATALOG_DEREGISTER, {"Node": "\ud800"}),
        (CATALOG_DEREGISTER, {"Node": "n", "ServiceID": "\ud800"}),
        (CHECK_REGISTER, {"Name": "\ud800"}),
        (CHECK_UPDATE, {"Output": "\ud800"}),
    ]
    for url, body in bodies:
        with subtests.test(url=url, body=body):
            assert_error(put_json(client, url, body), 400, "bad_request", "surrogate")
    assert_nothing_registered(client)


def test_json_nested_deeper_than_the_limit_is_400(client):
    deep: dict = {"Name": "w"}
    cur = deep
    for _ in range(100):
        cur["Meta"] = {}
        cur = cur["Meta"]
    assert_error(put_json(client, REGISTER, deep), 400, "bad_request", "nests deeper")
    # A registration of realistic depth is far from the limit.
    register(
        client,
        {
            "Name": "w",
            "Connect": {
                "SidecarService": {
                    "Proxy": {
                        "Upstreams": [{"DestinationName": "db", "Config": {"a": {"b": {"c": [1]}}}}]
                    }
                }
            },
        },
    )


# -- wrong types, bad values, unknown fields ---------------------------------------------------

#: (endpoint, body, the field the error must name)
WRONG = [
    # strings
    (REGISTER, {"Name": 1}, "Name"),
    (REGISTER, {"Name": "w", "ID": 5}, "ID"),
    (REGISTER, {"Name": "w", "Address": ["a"]}, "Address"),
    # integers: no strings, floats or booleans (Consul's Go decoder refuses them too)
    (REGISTER, {"Name": "w", "Port": "80"}, "Port"),
    (REGISTER, {"Name": "w", "Port": 1.5}, "Port"),
    (REGISTER, {"Name": "w", "Port": 80.0}, "Port"),
    (REGISTER, {"Name": "w", "Port": True}, "Port"),
    (REGISTER, {"Name": "w", "Port": None}, "Port"),
    (REGISTER, {"Name": "w", "Port": -1}, "Port"),
    (REGISTER, {"Name": "w", "Port": 65536}, "Port"),
    (REGISTER, {"Name": "w", "Port": 10**30}, "Port"),
    # lists
    (REGISTER, {"Name": "w", "Tags": "a"}, "Tags"),
    (REGISTER, {"Name": "w", "Tags": {"a": 1}}, "Tags"),
    (REGISTER, {"Name": "w", "Tags": [1]}, "Tags.0"),
    (REGISTER, {"Name": "w", "Tags": ["a", None]}, "Tags.1"),
    # maps
    (REGISTER, {"Name": "w", "Meta": []}, "Meta"),
    (REGISTER, {"Name": "w", "Meta": {"k": 1}}, "Meta"),
    (REGISTER, {"Name": "w", "Meta": {"bad key!": "v"}}, "Meta"),
    (REGISTER, {"Name": "w", "Meta": {"k": "v" * 513}}, "Meta"),
    # booleans
    (REGISTER, {"Name": "w", "EnableTagOverride": "banana"}, "EnableTagOverride"),
    (REGISTER, {"Name": "w", "EnableTagOverride": []}, "EnableTagOverride"),
    # enums
    (REGISTER, {"Name": "w", "Kind": "bogus"}, "Kind"),
    (REGISTER, {"Name": "w", "Kind": 1}, "Kind"),
    # nested objects
    (REGISTER, {"Name": "w", "Weights": 1}, "Weights"),
    (REGISTER, {"Name": "w", "Weights": {"Passing": "x"}}, "Weights.Passing"),
    (REGISTER, {"Name": "w", "Weights": {"Passing": 0}}, "Weights.Passing"),
    (REGISTER, {"Name": "w", "TaggedAddresses": {"lan": "x"}}, "TaggedAddresses"),
    (REGISTER, {"Name": "w", "TaggedAddresses": {"lan": {"Port": 1}}}, "Address"),
    (REGISTER, {"Name": "w", "TaggedAddresses": {"lan": {"Address": "a", "Port": "1"}}}, "Port"),
    (REGISTER, {"Name": "w", "Connect": "x"}, "Connect"),
    (REGISTER, {"Name": "w", "Connect": {"Native": "banana"}}, "Connect.Native"),
    (REGISTER, {"Name": "w", "Connect": {"SidecarService": "x"}}, "SidecarService"),
    (REGISTER, {"Name": "w", "Connect": {"SidecarService": {"Port": "x"}}}, "SidecarService.Port"),
    # checks
    (REGISTER, {"Name": "w", "Check": "x"}, "Check"),
    (REGISTER, {"Name": "w", "Check": {"TTL": 5}}, "Check.TTL"),
    (REGISTER, {"Name": "w", "Check": {"TTL": "abc"}}, "Check.TTL"),
    (REGISTER, {"Name": "w", "Check": {"TTL": "-1s"}}, "Check.TTL"),
    (REGISTER, {"Name": "w", "Check": {"Status": "bogus"}}, "Check.Status"),
    (REGISTER, {"Name": "w", "Check": {"HTTP": "ftp://x", "Interval": "1s"}}, "HTTP"),
    (REGISTER, {"Name": "w", "Check": {"HTTP": "http://x"}}, "Interval"),
    (REGISTER, {"Name": "w", "Check": {"TCP": "x:1", "TTL": "1s", "Interval": "1s"}}, "one type"),
    (REGISTER, {"Name": "w", "Check": {"Header": {"a": "b"}}}, "Check.Header"),
    (REGISTER, {"Name": "w", "Check": {"SuccessBeforePassing": "1"}}, "SuccessBeforePassing"),
    (REGISTER, {"Name": "w", "Check": {"FailuresBeforeCritical": -1}}, "FailuresBeforeCritical"),
    (REGISTER, {"Name": "w", "Check": {"TLSSkipVerify": "banana"}}, "TLSSkipVerify"),
    (REGISTER, {"Name": "w", "Checks": {}}, "Checks"),
    (REGISTER, {"Name": "w", "Checks": ["x"]}, "Checks.0"),
    # proxies
    (REGISTER, {"Name": "w", "Kind": "connect-proxy", "Proxy": "x"}, "Proxy"),
    (REGISTER, {"Name": "w", "Kind": "connect-proxy"}, "DestinationServiceName"),
    (REGISTER, {"Name": "w", "Kind": "connect-proxy", "Proxy": {}}, "DestinationServiceName"),
    (
        REGISTER,
        {"Name": "w", "Kind": "connect-proxy", "Proxy": {"DestinationServiceName": "bad name"}},
        "destination",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {"DestinationServiceName": "a", "Upstreams": "x"},
        },
        "Upstreams",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {"DestinationServiceName": "a", "Upstreams": [{"LocalBindPort": 1}]},
        },
        "DestinationName",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {
                "DestinationServiceName": "a",
                "Upstreams": [{"DestinationName": "db", "LocalBindPort": "9191"}],
            },
        },
        "LocalBindPort",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {
                "DestinationServiceName": "a",
                "Upstreams": [{"DestinationName": "db", "DestinationType": "bogus"}],
            },
        },
        "DestinationType",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {"DestinationServiceName": "a", "Config": []},
        },
        "Proxy.Config",
    ),
    (REGISTER, {"Name": "w", "Proxy": {"DestinationServiceName": "a"}}, "connect-proxy"),
    (REGISTER, {"Name": "w", "Connect": {"Native": True, "Proxy": {}}}, "native"),
    (
        REGISTER,
        {"Name": "w", "Connect": {"SidecarService": {"Connect": {"SidecarService": {}}}}},
        "nested SidecarService",
    ),
    # names and IDs
    (REGISTER, {}, "Name"),
    (REGISTER, {"Name": ""}, "Name"),
    (REGISTER, {"Name": "bad name"}, "not valid"),
    (REGISTER, {"Name": "-w"}, "not valid"),
    (REGISTER, {"Name": "w" * 129}, "not valid"),
    # '/' is allowed (Patroni's "scope/name"); what no request path could name is not.
    (REGISTER, {"Name": "w", "ID": "a\u2028b"}, "not valid"),
    (REGISTER, {"Name": "w", "ID": "a\u0001b"}, "not valid"),
    (REGISTER, {"name": "w", "Name": "w"}, "twice"),
    (REGISTER, {"Name": "w", "Meta": {"k": "v"}, "meta": {}}, "twice"),
    # catalog/register
    (CATALOG_REGISTER, {}, "Node"),
    (CATALOG_REGISTER, {"Node": "n"}, "Address"),
    (CATALOG_REGISTER, {"Node": 1, "Address": "a"}, "Node"),
    (CATALOG_REGISTER, {"Node": "n", "Address": 1}, "Address"),
    (CATALOG_REGISTER, {"Node": "bad node", "Address": "a"}, "not valid"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "ID": 1}, "ID"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "NodeMeta": []}, "NodeMeta"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "NodeMeta": {"k": 1}}, "NodeMeta"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "TaggedAddresses": {"lan": 1}}, "lan"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Service": "x"}, "Service"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Service": {"Service": 1}}, "Service"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Service": {"Port": 1}}, "Name"),
    (
        CATALOG_REGISTER,
        {"Node": "n", "Address": "a", "Service": {"Service": "s", "Port": "1"}},
        "Service.Port",
    ),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Check": "x"}, "Check"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Checks": {}}, "Checks"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Check": {"Status": "passing"}}, "CheckID"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "SkipNodeUpdate": "banana"}, "SkipNode"),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Datacenter": 1}, "Datacenter"),
    # catalog/deregister
    (CATALOG_DEREGISTER, {}, "Node"),
    (CATALOG_DEREGISTER, {"Node": 1}, "Node"),
    (CATALOG_DEREGISTER, {"Node": "n", "ServiceID": 1}, "ServiceID"),
    (CATALOG_DEREGISTER, {"Node": "n", "CheckID": []}, "CheckID"),
    # Accepted with any value before the body had a schema; openapi.yaml says strings.
    (CATALOG_DEREGISTER, {"Node": "n", "Datacenter": 5}, "Datacenter"),
    (CATALOG_DEREGISTER, {"Node": "n", "Namespace": {}}, "Namespace"),
    # agent checks
    (CHECK_REGISTER, {}, "Name"),
    (CHECK_REGISTER, {"Name": 1}, "Name"),
    (CHECK_REGISTER, {"Name": "c", "TTL": 5}, "TTL"),
    (CHECK_UPDATE, {"Status": 1}, "Status"),
    (CHECK_UPDATE, {"Status": "maintenance"}, "Status"),
    (CHECK_UPDATE, {"Output": []}, "Output"),
]

UNKNOWN = [
    (REGISTER, {"Name": "w", "Bogus": 1}, "Bogus"),
    (REGISTER, {"name": "w", "bogus_field": 1}, "BogusField"),
    (REGISTER, {"Name": "w", "Check": {"TTL": "1s", "Bogus": 1}}, "Check.Bogus"),
    (REGISTER, {"Name": "w", "Checks": [{"TTL": "1s", "Bogus": 1}]}, "Checks.0.Bogus"),
    (REGISTER, {"Name": "w", "Weights": {"Passing": 1, "Bogus": 1}}, "Weights.Bogus"),
    (REGISTER, {"Name": "w", "Connect": {"Bogus": 1}}, "Connect.Bogus"),
    (REGISTER, {"Name": "w", "Connect": {"SidecarService": {"Bogus": 1}}}, "Bogus"),
    (
        REGISTER,
        {"Name": "w", "TaggedAddresses": {"lan": {"Address": "a", "Bogus": 1}}},
        "Bogus",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {"DestinationServiceName": "a", "Bogus": 1},
        },
        "Proxy.Bogus",
    ),
    (
        REGISTER,
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Proxy": {
                "DestinationServiceName": "a",
                "Upstreams": [{"DestinationName": "d", "Bogus": 1}],
            },
        },
        "Upstreams.0.Bogus",
    ),
    (CATALOG_REGISTER, {"Node": "n", "Address": "a", "Bogus": 1}, "Bogus"),
    (
        CATALOG_REGISTER,
        {"Node": "n", "Address": "a", "Service": {"Service": "s", "Bogus": 1}},
        "Service.Bogus",
    ),
    (CATALOG_DEREGISTER, {"Node": "n", "Bogus": 1}, "Bogus"),
    (CHECK_REGISTER, {"Name": "c", "Bogus": 1}, "Bogus"),
    (CHECK_UPDATE, {"Status": "passing", "Bogus": 1}, "Bogus"),
]


def test_wrong_types_and_bad_values_are_400(client, subtests):
    for url, body, field in WRONG:
        with subtests.test(url=url, body=body):
            r = put_json(client, url, body)
            assert_error(r, 400, "bad_request", field)
    assert_nothing_registered(client)
    assert client.get(f"/v1/health/node/{NODE}").get_json()[0]["Status"] == "passing"


def test_unknown_fields_are_400(client, subtests):
    for url, body, field in UNKNOWN:
        with subtests.test(url=url, body=body):
            r = put_json(client, url, body)
            assert_error(r, 400, "bad_request", field)
    assert_nothing_registered(client)


# -- sizes and media types ---------------------------------------------------------------------


def padded(body: dict, size: int) -> bytes:
    """``body`` as JSON, padded with spaces (still valid JSON) to exactly ``size`` bytes."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_body_size_limit_default(client):
    r = client.put(REGISTER, data=padded({"Name": "a"}, MIB), content_type="application/json")
    assert r.status_code == 200
    r = client.put(REGISTER, data=padded({"Name": "b"}, MIB + 1), content_type="application/json")
    assert_error(r, 413, contains="body")
    r = client.put(REGISTER, data=padded({"Name": "c"}, 3 * MIB), content_type="application/json")
    assert_error(r, 413)
    assert list(client.get("/v1/agent/services").get_json()) == ["a"]


def test_body_size_limit_from_settings(make_client, subtests):
    # http_max_body below the K/V value limit used to be ignored for JSON bodies.
    client = make_client(http_max_body=1024)
    for url, body in (
        (REGISTER, {"Name": "a"}),
        (CATALOG_REGISTER, {"Node": "n", "Address": "a"}),
    ):
        with subtests.test(url=url):
            r = client.put(url, data=padded(body, 1024), content_type="application/json")
            assert r.status_code == 200
            r = client.put(url, data=padded(body, 1025), content_type="application/json")
            assert_error(r, 413, "payload_too_large", "1024 byte limit")
    # K/V values keep their own limit.
    assert client.put("/v1/kv/k", data=b"x" * 4096).get_json() is True


def test_form_bodies_are_400(client, subtests):
    # The Content-Type is not looked at (as in Consul): a form is a body that is not JSON.
    for url in JSON_ENDPOINTS:
        with subtests.test(url=url, kind="urlencoded"):
            r = client.put(url, data={"Name": "w", "Node": "n"})
            assert_error(r, 400, "bad_request", "not valid JSON")
        with subtests.test(url=url, kind="multipart"):
            r = client.put(
                url,
                data=b'--b\r\nContent-Disposition: form-data; name="Name"\r\n\r\nw\r\n--b--\r\n',
                content_type="multipart/form-data; boundary=b",
            )
            assert_error(r, 400, "bad_request", "not valid JSON")
    assert_nothing_registered(client)


def test_json_with_other_content_types_is_accepted(client):
    # Consul clients send JSON with assorted content types, or none; ``curl -d @svc.json``
    # sends it as a form.
    ctypes = (
        "",
        "text/plain",
        "application/octet-stream",
        "application/x-json",
        "application/x-www-form-urlencoded",
    )
    for n, ctype in enumerate(ctypes):
        r = client.put(REGISTER, data=json.dumps({"Name": f"s{n}"}), content_type=ctype or None)
        assert r.status_code == 200, ctype
    assert sorted(client.get("/v1/agent/services").get_json()) == [f"s{n}" for n in range(5)]


# -- routes and methods ------------------------------------------------------------------------


def test_unknown_routes_are_404_json(client, subtests):
    for method, path in (
        ("GET", "/v1/nope"),
        ("GET", "/nope"),
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/agent/bogus"),
        ("GET", "/v1/catalog/services/extra"),
        ("DELETE", "/v1/nope"),
        ("POST", "/v2/kv/a"),
    ):
        with subtests.test(method=method, path=path):
            r = client.open(path, method=method)
            body = assert_error(r, 404, "not_found")
            assert body == {
                "error": f"no such endpoint: {method} {path}",
                "code": "not_found",
                "status": 404,
            }


def test_wrong_methods_are_405_json_with_allow(client, subtests):
    for method, path, allowed in (
        ("POST", "/v1/kv/a", {"GET", "PUT", "DELETE"}),
        ("PATCH", "/v1/kv/", {"GET", "PUT", "DELETE"}),
        ("GET", "/v1/agent/service/deregister/x", {"PUT"}),
        ("GET", "/v1/agent/service/deregister/a/b", {"PUT"}),
        # IDs may hold slashes, so this is /v1/agent/service/{service_id} (as in Consul, whose
        # /v1/agent/service/ handler answers it a 405 too).
        ("PUT", "/v1/agent/service/register/extra", {"GET"}),
        # /v1/agent/service/register is also /v1/agent/service/{service_id}, so GET is
        # allowed (and is a lookup of the service "register").
        ("POST", REGISTER, {"GET", "PUT"}),
        ("DELETE", "/v1/catalog/services", {"GET"}),
        ("PUT", "/v1/agent/services", {"GET"}),
        ("POST", "/v1/status/leader", {"GET"}),
        ("GET", "/v1/agent/check/pass/x", {"PUT"}),
        ("DELETE", CATALOG_DEREGISTER, {"PUT"}),
    ):
        with subtests.test(method=method, path=path):
            r = client.open(path, method=method)
            body = assert_error(r, 405, "method_not_allowed")
            assert body["error"] == f"method {method} is not allowed on {path}"
            allow = {m.strip() for m in r.headers["Allow"].split(",")}
            assert allowed <= allow
            assert allow - allowed <= {"HEAD", "OPTIONS"}


# -- URLs and query strings --------------------------------------------------------------------


def test_invalid_utf8_in_urls(client, subtests):
    register(client, {"Name": "web"})
    for method, url, status in (
        ("GET", "/v1/catalog/service/%FF", 200),
        ("GET", "/v1/catalog/connect/%FF%FE", 200),
        ("GET", "/v1/health/service/%C3%28", 200),
        ("GET", "/v1/health/checks/%FF", 200),
        ("GET", "/v1/health/node/%FF", 200),
        ("GET", "/v1/catalog/node/%FF", 200),
        ("GET", "/v1/agent/service/%FF", 404),
        ("PUT", "/v1/agent/service/deregister/%FF", 404),
        ("PUT", "/v1/agent/check/pass/%FF", 404),
        ("GET", "/v1/health/state/%FF", 400),
        ("GET", "/v1/kv/%FF", 400),
        ("PUT", "/v1/kv/a/%C3%28", 400),
        ("DELETE", "/v1/kv/%ED%A0%80", 400),  # an encoded surrogate is not UTF-8 either
        ("GET", "/v1/catalog/service/web?tag=%FF", 200),
        ("GET", "/v1/catalog/services?dc=%FF", 400),
        ("GET", "/v1/kv/a?separator=%FF&keys", 404),
        ("PUT", "/v1/agent/check/pass/serfHealth?note=%FF%FE", 200),
    ):
        with subtests.test(method=method, url=url):
            r = client.open(url, method=method)
            assert r.status_code == status, r.get_data(as_text=True)
            if status >= 400:
                assert_error(r, status)
    assert client.get("/v1/kv/?recurse").status_code == 404
    assert list(client.get("/v1/agent/services").get_json()) == ["web"]


def test_huge_query_strings(client, subtests):
    register(client, {"Name": "web", "Tags": ["t"]})
    big = "x" * 200_000
    for url, status in (
        (f"/v1/catalog/services?junk={big}", 200),
        ("/v1/catalog/services?" + "&".join(f"k{i}=v" for i in range(20_000)), 200),
        (f"/v1/catalog/service/web?tag={big}", 200),
        (f"/v1/health/service/web?tag={big}&tag={big}", 200),
        (f"/v1/catalog/services?dc={'d' * 65}", 400),
        (f"/v1/kv/a?keys&separator={'/' * 65}", 400),
        (f"/v1/kv/a?index={'9' * 10_000}", 400),
        (f"/v1/kv/a?index={'0' * 10_000}", 404),  # zero, however it is written
        # A wait past any real duration is refused, as Go's ParseDuration refuses overflow.
        (f"/v1/kv/a?wait={'9' * 10_000}s", 400),
        (f"/v1/agent/services?hash={'h' * 513}", 400),
        # recurse is set by its presence, whatever its value, as in Consul: nothing under "a".
        (f"/v1/kv/a?recurse={big}", 404),
        (f"/v1/health/service/web?passing={big}", 400),
    ):
        with subtests.test(url=url[:80]):
            r = client.get(url)
            assert r.status_code == status, r.get_data(as_text=True)[:300]
            if status >= 400:
                assert_error(r, status)
    with subtests.test("long note"):
        r = client.put(f"/v1/agent/check/pass/serfHealth?note={'n' * 8193}")
        assert_error(r, 400, "bad_request", "note")


def test_non_ascii_digits_in_numeric_parameters_are_400(client, subtests):
    client.put("/v1/kv/k", data=b"v")
    for digits in ("\u0661", "\uff11", "\u00b2", "\u2460", "\U0001d7cf"):
        for url in (f"/v1/kv/k?index={digits}", f"/v1/kv/k?cas={digits}"):
            with subtests.test(url=url):
                r = client.open(url, method="PUT" if "cas" in url else "GET", data=b"x")
                assert_error(r, 400, "bad_request", "whole number")
    assert client.get("/v1/kv/k?raw").get_data() == b"v"


# -- random JSON -------------------------------------------------------------------------------

#: Field names of the registration schemas, both spellings, so that random objects reach the
#: validators of nested fields and not only the "unknown field" check.
FIELDS = [
    "Name", "ID", "Service", "Tags", "Address", "Port", "Meta", "Weights", "Passing", "Warning",
    "TaggedAddresses", "Kind", "Proxy", "Connect", "Native", "SidecarService", "Check",
    "Checks", "TTL", "HTTP", "TCP", "Interval", "Timeout", "Status", "CheckID", "ServiceID",
    "DestinationServiceName", "Upstreams", "DestinationName", "LocalBindPort", "Config",
    "EnableTagOverride", "Node", "NodeMeta", "Datacenter", "SkipNodeUpdate", "Header",
    "name", "port", "tags", "connect", "sidecar_service", "proxy", "check", "ttl",
    "destination_name", "local_bind_port", "upstreams", "service", "lan", "wan",
]  # fmt: skip

NASTY_STRINGS = st.sampled_from(
    ["", "web", "connect-proxy", "passing", "10s", "http://x", "a:1", "\x00", "\ud800",
     "a/b", "..", "-1s", "\u00e9", "x" * 600, "critical", "1", "true", "null"]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | NASTY_STRINGS
)
KEYS = st.sampled_from(FIELDS) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=25,
)
BODIES = st.dictionaries(KEYS, JSON_VALUES, max_size=8) | JSON_VALUES


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    url=st.sampled_from([REGISTER, CATALOG_REGISTER]),
    body=BODIES,
    wrap=st.booleans(),
)
def test_random_json_never_500(client, url, body, wrap):
    if wrap and url == REGISTER:
        body = {"service": body}  # the config-file form
    # json.dumps writes NaN/Infinity and lone surrogates as they come: both must be refused.
    r = put_json(client, url, json.dumps(body))
    assert r.status_code < 500, r.get_data(as_text=True)
    if r.status_code >= 400:
        assert_error(r, r.status_code)
    else:
        assert r.status_code == 200
    # Whatever was accepted reads back as JSON.
    assert client.get("/v1/agent/services").status_code == 200
    assert client.get("/v1/catalog/services").status_code == 200
