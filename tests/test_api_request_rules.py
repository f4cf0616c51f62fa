"""Consul's request rules (issue 14, item 6): body field names in any case, ``WriteRequest`` and
``QueryOptions`` ignored, boolean query flags read as Consul reads them, and paths that are not
clean (``/v1/kv/a//b``) answered as Consul's ServeMux answers them.

The pure parts (``fold_names``, ``clean_path``) are table-tested; the rest goes through the app
on both stores (``client``), and one py-consul round trip over real HTTP against ``trellis dev``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul
import pytest

from tests import api_fixtures
from tests.api_fixtures import assert_error, put_json
from trellis.api.errors import BadRequest
from trellis.api.http import clean_path
from trellis.api.schemas import fold_names
from trellis.api.schemas.acl import PolicySchema, TokenSchema
from trellis.api.schemas.catalog import (
    CatalogDeregisterSchema,
    CatalogRegisterSchema,
    CheckSchema,
    ServiceSchema,
)

make_client = api_fixtures.make_client
client = api_fixtures.client


def _instance(schema):
    return schema()


# -- field names in any case (pure) ----------------------------------------------------------

FOLD_CASES = [
    pytest.param(
        CatalogDeregisterSchema,
        {"node": "n", "serviceid": "web-1", "CHECKID": "c", "datacenter": "dc1"},
        {"Node": "n", "ServiceID": "web-1", "CheckID": "c", "Datacenter": "dc1"},
        id="deregister-as-python-consul-sends-it",
    ),
    pytest.param(
        PolicySchema,
        {"name": "p", "rules": "", "DESCRIPTION": "d"},
        {"Name": "p", "Rules": "", "Description": "d"},
        id="policy-data-keys",
    ),
    pytest.param(
        TokenSchema,
        {"policies": [{"name": "p"}, {"id": "x"}]},
        {"Policies": [{"Name": "p"}, {"ID": "x"}]},
        id="token-policy-links",
    ),
    pytest.param(
        ServiceSchema,
        {
            "name": "web",
            "meta": {"Team_Name": "Edge", "x": "y"},
            "taggedaddresses": {"LAN_v4": {"address": "10.0.0.1", "port": 80}},
            "check": {"ttl": "10s", "checkid": "c1"},
            "checks": [{"http": "http://x", "interval": "1s"}],
            "connect": {
                "sidecarservice": {
                    "proxy": {
                        "config": {"Local_Key": 1},
                        "upstreams": [{"destinationname": "db", "localbindport": 9}],
                    }
                }
            },
            "weights": {"passing": 2},
        },
        {
            "Name": "web",
            # Maps hold data: their keys keep their case.
            "Meta": {"Team_Name": "Edge", "x": "y"},
            "TaggedAddresses": {"LAN_v4": {"Address": "10.0.0.1", "Port": 80}},
            "Check": {"TTL": "10s", "CheckID": "c1"},
            "Checks": [{"HTTP": "http://x", "Interval": "1s"}],
            "Connect": {
                "SidecarService": {
                    "Proxy": {
                        "Config": {"Local_Key": 1},
                        "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9}],
                    }
                }
            },
            "Weights": {"Passing": 2},
        },
        id="nested-structs-folded-maps-kept",
    ),
    pytest.param(
        CatalogRegisterSchema,
        {"nodemeta": {"Rack_ID": "r1"}, "TaggedAddresses": {"WAN": "1.2.3.4"}},
        {"NodeMeta": {"Rack_ID": "r1"}, "TaggedAddresses": {"WAN": "1.2.3.4"}},
        id="node-maps-kept",
    ),
    pytest.param(
        CheckSchema,
        # Go's bytes.EqualFold: the Kelvin sign is "k", the long s is "s".
        {"tls\u017f\u212aipverify": True, "\u017fERVICEid": "x", "NOTES": "n"},
        {"TLSSkipVerify": True, "ServiceID": "x", "Notes": "n"},
        id="unicode-simple-folding",
    ),
    pytest.param(
        CheckSchema,
        {"Bogus": 1, "status": "passing", 7: "x"},
        {"Bogus": 1, "Status": "passing", 7: "x"},
        id="unknown-names-kept-for-the-schema-to-refuse",
    ),
    pytest.param(CheckSchema, ["not", "an", "object"], ["not", "an", "object"], id="not-a-map"),
]


@pytest.mark.parametrize(("schema", "body", "folded"), FOLD_CASES)
def test_fold_names(schema, body, folded):
    assert fold_names(_instance(schema), body) == folded


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        (CatalogDeregisterSchema, {"Node": "a", "node": "b"}),
        (ServiceSchema, {"Check": {"TTL": "1s", "ttl": "2s"}}),
        (PolicySchema, {"Rules": "", "RULES": ""}),
    ],
)
def test_a_field_given_twice_in_two_spellings_is_refused(schema, body):
    with pytest.raises(BadRequest, match="given twice"):
        fold_names(_instance(schema), body)


# -- field names in any case, on every endpoint with a JSON body ----------------------------


def test_catalog_register_and_deregister_as_python_consul_spells_them(client):
    body = {
        "node": "n1",
        "address": "10.0.0.1",
        "datacenter": "dc1",
        "nodemeta": {"Rack_ID": "r1"},
        "service": {"service": "web", "id": "web-1", "port": 80, "meta": {"Team_Name": "e"}},
        "check": {"checkid": "c1", "name": "alive", "serviceid": "web-1", "status": "passing"},
    }
    r = put_json(client, "/v1/catalog/register", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    (inst,) = client.get("/v1/catalog/service/web").get_json()
    assert inst["ServiceID"] == "web-1" and inst["ServicePort"] == 80
    assert inst["ServiceMeta"] == {"Team_Name": "e"} and inst["NodeMeta"] == {"Rack_ID": "r1"}
    (check,) = client.get("/v1/health/checks/web").get_json()
    assert check["CheckID"] == "c1" and check["Status"] == "passing"

    r = put_json(client, "/v1/catalog/deregister", {"node": "n1", "serviceid": "web-1"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert client.get("/v1/catalog/service/web").get_json() == []


def test_agent_service_and_check_register_in_any_case(client):
    body = {
        "NAME": "api",
        "id": "api-1",
        "Port": 8080,
        "META": {"snake_key": "v"},
        "check": {"TTL": "10s"},
        "connect": {"SIDECARSERVICE": {"proxy": {"upstreams": [{"destinationname": "db"}]}}},
    }
    r = put_json(client, "/v1/agent/service/register", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    svc = client.get("/v1/agent/service/api-1").get_json()
    assert svc["Service"] == "api" and svc["Meta"] == {"snake_key": "v"}
    sidecar = client.get("/v1/agent/service/api-1-sidecar-proxy").get_json()
    assert [u["DestinationName"] for u in sidecar["Proxy"]["Upstreams"]] == ["db"]

    check = {"name": "mem", "checkid": "mem", "ttl": "30s", "serviceid": "api-1"}
    r = put_json(client, "/v1/agent/check/register", check)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert client.get("/v1/agent/checks").get_json()["mem"]["ServiceID"] == "api-1"
    r = put_json(client, "/v1/agent/check/update/mem", {"status": "warning", "OUTPUT": "hi"})
    assert r.status_code == 200, r.get_data(as_text=True)
    got = client.get("/v1/agent/checks").get_json()["mem"]
    assert (got["Status"], got["Output"]) == ("warning", "hi")


def test_intentions_and_ca_configuration_in_any_case(client):
    r = put_json(
        client,
        "/v1/connect/intentions/exact?source=web&destination=db",
        {"action": "allow", "description": "d"},
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    r = client.get("/v1/connect/intentions/exact?source=web&destination=db")
    assert r.get_json()["Action"] == "allow"

    config = client.get("/v1/connect/ca/configuration").get_json()
    body = {"provider": config["Provider"], "config": {"leafcertttl": "48h"}}
    r = put_json(client, "/v1/connect/ca/configuration", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    got = client.get("/v1/connect/ca/configuration").get_json()["Config"]
    assert got["LeafCertTTL"] == "48h"


def test_session_create_in_any_case(client):
    r = put_json(client, "/v1/session/create", {"name": "s", "ttl": "15s", "BEHAVIOR": "delete"})
    assert r.status_code == 200, r.get_data(as_text=True)
    (s,) = client.get(f"/v1/session/info/{r.get_json()['ID']}").get_json()
    assert (s["Name"], s["TTL"], s["Behavior"]) == ("s", "15s", "delete")


def test_acl_policy_and_token_in_any_case(make_client):
    c = make_client(acl_enabled=True, acl_default_policy="deny")
    secret = c.put("/v1/acl/bootstrap").get_json()["SecretID"]
    auth = {"X-Consul-Token": secret}
    body = {"name": "kv-read", "rules": 'key_prefix "" { policy = "read" }'}
    r = c.put("/v1/acl/policy", data=json.dumps(body), headers=auth)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["Rules"] == body["rules"]
    r = c.put(
        "/v1/acl/token",
        data=json.dumps({"description": "t", "policies": [{"name": "kv-read"}]}),
        headers=auth,
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    assert [p["Name"] for p in r.get_json()["Policies"]] == ["kv-read"]


def test_unknown_fields_are_still_refused_in_any_case(client):
    assert_error(
        put_json(client, "/v1/catalog/deregister", {"node": "n", "bogus": 1}), 400, "bad_request"
    )
    body = {"Name": "x", "Check": {"TTL": "1s", "tll": "2s"}}
    assert_error(put_json(client, "/v1/agent/service/register", body), 400, "bad_request")
    body = {"Name": "x", "name": "y"}
    assert_error(put_json(client, "/v1/agent/service/register", body), 400, "bad_request", "twice")


# -- WriteRequest and QueryOptions -----------------------------------------------------------


def test_write_request_and_query_options_are_accepted_and_ignored(client):
    body = {
        "Node": "n1",
        "Address": "10.0.0.1",
        "WriteRequest": {"Token": "whatever"},
        "queryoptions": {"AllowStale": True},
    }
    r = put_json(client, "/v1/catalog/register", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    r = put_json(client, "/v1/catalog/deregister", {"node": "n1", "writerequest": None})
    assert r.status_code == 200, r.get_data(as_text=True)
    r = put_json(client, "/v1/catalog/deregister", {"node": "n1", "WriteRequest": "token"})
    assert_error(r, 400, "bad_request", "WriteRequest must be an object")


def test_a_token_only_in_write_request_is_refused_with_acls_on(make_client):
    c = make_client(acl_enabled=True, acl_default_policy="deny")
    secret = c.put("/v1/acl/bootstrap").get_json()["SecretID"]
    body = {"Node": "n1", "Address": "10.0.0.1", "WriteRequest": {"Token": secret}}
    # Consul would run it as anonymous; the client meant its token.
    r = put_json(c, "/v1/catalog/register", body)
    assert_error(r, 400, "bad_request", "X-Consul-Token")
    r = c.put("/v1/catalog/register", data=json.dumps(body), headers={"X-Consul-Token": secret})
    assert r.status_code == 200, r.get_data(as_text=True)


# -- boolean query flags ---------------------------------------------------------------------

#: (query, what Consul does): True/False the flag, None a 400.
PRESENCE = [
    ("recurse", True),
    ("recurse=", True),
    ("recurse=1", True),
    ("recurse=None", True),
    ("recurse=true", True),
    ("recurse=yes", True),
    ("recurse=false", None),  # Consul: set. Trellis: refused (README, Consul request rules)
    ("recurse=0", None),
    ("recurse=False", None),
    ("", False),
]


@pytest.mark.parametrize(("query", "expected"), PRESENCE)
def test_recurse_keys_and_raw_are_set_by_presence(client, query, expected):
    for key in ("app/a", "app/b"):
        assert client.put(f"/v1/kv/{key}", data=b"v").get_json() is True
    r = client.get(f"/v1/kv/app/?{query}")
    if expected is None:
        assert_error(r, 400, "bad_request", "presence")
        return
    if not expected:
        assert r.status_code == 404  # no key "app/" itself
        return
    assert [e["Key"] for e in r.get_json()] == ["app/a", "app/b"]
    keys_query = query.replace("recurse", "keys")
    assert client.get(f"/v1/kv/app/?{keys_query}").get_json() == ["app/a", "app/b"]
    raw_query = query.replace("recurse", "raw")
    assert client.get(f"/v1/kv/app/a?{raw_query}").get_data() == b"v"


def test_delete_recurse_false_deletes_nothing(client):
    for key in ("app/a", "app/b"):
        assert client.put(f"/v1/kv/{key}", data=b"v").get_json() is True
    assert_error(client.delete("/v1/kv/app/?recurse=false"), 400, "bad_request")
    assert client.get("/v1/kv/app/?keys").get_json() == ["app/a", "app/b"]
    assert client.delete("/v1/kv/app/?recurse=None").get_json() is True
    assert client.get("/v1/kv/app/?keys").status_code == 404


#: Go's strconv.ParseBool, no value being true (Consul's getBoolQueryParam).
VALUED = [
    ("passing", True),
    ("passing=", True),
    ("passing=1", True),
    ("passing=t", True),
    ("passing=True", True),
    ("passing=TRUE", True),
    ("passing=0", False),
    ("passing=f", False),
    ("passing=False", False),
    ("passing=None", None),  # a 400 in Consul too
    ("passing=yes", None),
    ("passing=tRuE", None),
]


@pytest.mark.parametrize(("query", "expected"), VALUED)
def test_passing_is_read_as_go_parses_a_bool(client, query, expected):
    for sid, status in (("web-1", "critical"), ("web-2", "passing")):
        body = {"Name": "web", "ID": sid, "Check": {"TTL": "60s", "Status": status}}
        assert put_json(client, "/v1/agent/service/register", body).status_code == 200
    r = client.get(f"/v1/health/service/web?{query}")
    if expected is None:
        assert_error(r, 400, "bad_request", "passing")
        return
    ids = sorted(e["Service"]["ID"] for e in r.get_json())
    assert ids == (["web-2"] if expected else ["web-1", "web-2"])


@pytest.mark.parametrize(
    ("query", "pem"),
    [("pem", True), ("pem=", True), ("pem=true", True), ("pem=1", True), ("pem=false", False)],
)
def test_pem_flag(client, query, pem):
    r = client.get(f"/v1/connect/ca/roots?{query}")
    assert r.status_code == 200
    assert (r.mimetype == "application/pem-certificate-chain") is pem
    assert_error(client.get("/v1/connect/ca/roots?pem=None"), 400, "bad_request")


# -- paths that are not clean ----------------------------------------------------------------

CLEAN = [
    ("/v1/kv/a/b", "/v1/kv/a/b"),
    ("/v1/kv/a//b", "/v1/kv/a/b"),
    ("/v1/kv//a", "/v1/kv/a"),
    ("/v1//kv/a", "/v1/kv/a"),
    ("/v1/kv/dir/", "/v1/kv/dir/"),
    ("/v1/kv/dir//", "/v1/kv/dir/"),
    ("/v1/kv/", "/v1/kv/"),
    ("/v1/kv/a/./b", "/v1/kv/a/b"),
    ("/v1/kv/a/../b", "/v1/kv/b"),
    ("/v1/kv/a/..", "/v1/kv"),
    ("/../../v1/kv/x", "/v1/kv/x"),
    ("/v1/kv/...", "/v1/kv/..."),
    ("/v1/kv/.hidden/a.b", "/v1/kv/.hidden/a.b"),
    ("/", "/"),
    ("//", "/"),
    ("", "/"),
]


@pytest.mark.parametrize(("path", "clean"), CLEAN)
def test_clean_path_is_go_servemux_clean_path(path, clean):
    assert clean_path(path) == clean


def test_a_read_of_an_unclean_path_is_redirected_as_consul_does(client):
    assert client.put("/v1/kv/a/b", data=b"v").get_json() is True
    r = client.get("/v1/kv/a//b?raw&dc=dc1")
    assert r.status_code == 301
    assert r.headers["Location"] == "/v1/kv/a/b?raw&dc=dc1"
    assert client.get(r.headers["Location"]).get_data() == b"v"
    r = client.head("/v1/kv//a/b")
    assert (r.status_code, r.headers["Location"]) == (301, "/v1/kv/a/b")
    # Every endpoint, as Go's ServeMux cleans before routing (no spec path: unchecked).
    r = client.raw.get("/v1//catalog/services")
    assert (r.status_code, r.headers["Location"]) == (301, "/v1/catalog/services")
    r = client.raw.get("/v1/kv/caf%C3%A9//x")
    assert r.headers["Location"] == "/v1/kv/caf%C3%A9/x"


def test_a_write_to_an_unclean_path_is_refused_and_writes_nothing(client):
    assert client.put("/v1/kv/a/b", data=b"v").get_json() is True
    assert_error(client.put("/v1/kv/a//b", data=b"w"), 400, "bad_request", "/v1/kv/a/b")
    assert_error(client.put("/v1/kv/x//y", data=b"w"), 400, "bad_request")
    assert_error(client.delete("/v1/kv/a//b"), 400, "bad_request")
    # No spec path matches /v1//kv: unchecked.
    assert_error(client.raw.delete("/v1//kv/a/b?recurse"), 400, "bad_request")
    assert client.get("/v1/kv/?keys").get_json() == ["a/b"]
    assert client.get("/v1/kv/a/b?raw").get_data() == b"v"


def test_trailing_slash_keys_are_folders(client):
    assert client.put("/v1/kv/dir/", data=b"").get_json() is True
    assert client.put("/v1/kv/dir/k", data=b"v").get_json() is True
    (folder,) = client.get("/v1/kv/dir/").get_json()
    assert (folder["Key"], folder["Value"]) == ("dir/", None)
    assert client.get("/v1/kv/dir/?keys").get_json() == ["dir/", "dir/k"]
    assert [e["Key"] for e in client.get("/v1/kv/?recurse").get_json()] == ["dir/", "dir/k"]
    assert client.get("/v1/kv/?keys&separator=/").get_json() == ["dir/"]
    assert client.get("/v1/kv/dir").status_code == 404


# -- py-consul over real HTTP ----------------------------------------------------------------


@pytest.fixture
def c(trellis_server) -> Iterator[consul.Consul]:
    port = urlsplit(trellis_server.url).port
    py = consul.Consul(host="127.0.0.1", port=port)
    yield py
    py.http.session.close()  # an idle keep-alive would hold a worker at the server's stop


@pytest.mark.integration
def test_py_consul_round_trip_of_the_forms_it_sends(c):
    # catalog.register with a token: lower-case keys, WriteRequest in the body, ?token=.
    assert c.catalog.register(
        "n1",
        "10.0.0.1",
        service={"service": "web", "id": "web-1", "port": 80, "meta": {"Team_Name": "e"}},
        check={"checkid": "c1", "name": "alive", "serviceid": "web-1", "status": "passing"},
        token="ignored-with-acls-off",
    )
    _, nodes = c.catalog.service("web")
    assert [(n["ServiceID"], n["ServiceMeta"]) for n in nodes] == [("web-1", {"Team_Name": "e"})]
    _, healthy = c.health.service("web", passing=True)  # ?passing=1
    assert [h["Service"]["ID"] for h in healthy] == ["web-1"]
    # catalog.deregister sends "serviceid" and WriteRequest.
    assert c.catalog.deregister("n1", service_id="web-1", token="ignored-with-acls-off")
    assert c.catalog.service("web")[1] == []

    # K/V: ?recurse=1, ?keys=True, a folder key.
    assert c.kv.put("cfg/", None)
    assert c.kv.put("cfg/a", "1")
    assert c.kv.get("cfg/", keys=True)[1] == ["cfg/", "cfg/a"]
    assert [e["Key"] for e in c.kv.get("cfg/", recurse=True)[1]] == ["cfg/", "cfg/a"]
    assert c.kv.delete("cfg/", recurse=True)
    assert c.kv.get("cfg/", recurse=True)[1] is None


def test_no_schema_has_two_fields_that_differ_only_in_case():
    # fold_names would have to pick one of them; _shape refuses the schema instead.
    import importlib
    import inspect
    import pkgutil

    import marshmallow

    import trellis.api.schemas as package
    from trellis.api.schemas import _shape

    seen = 0
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, marshmallow.Schema) and cls.__module__ == module.__name__:
                _shape(cls())
                seen += 1
    assert seen >= 15
