"""``/v1/agent/*``, ``/v1/catalog/*``, ``/v1/health/*`` and ``/v1/status/*``, in-process, on
SQLite and on PostgreSQL, with exact response bodies.

The registration bodies of DESIGN.md (flows 2 and 3) are used verbatim.
"""

from __future__ import annotations

import time

from tests import api_fixtures
from tests.api_fixtures import (
    NODE,
    assert_error,
    catalog_register,
    current_index,
    index_of,
    put_json,
    register,
    wait_until,
)

# Fixtures, bound here so that pytest finds them in this module.
client = api_fixtures.client
make_client = api_fixtures.make_client
store_kind = api_fixtures.store_kind

FLOW_2 = {"service": {"name": "web", "port": 8080, "connect": {"proxy": {}}}}
FLOW_3 = {
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

SERF = "serfHealth"


def agent_service(sid: str, name: str, **fields) -> dict:
    """The /v1/agent/services shape of one service, with Consul's defaults."""
    d = {
        "ID": sid,
        "Service": name,
        "Tags": [],
        "Address": "",
        "TaggedAddresses": {},
        "Meta": {},
        "Port": 0,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Kind": "",
        "Datacenter": "dc1",
    }
    d.update(fields)
    # As Consul's agent endpoints: no Kind or TaggedAddresses when empty.
    return {k: v for k, v in d.items() if not (k in ("Kind", "TaggedAddresses") and not v)}


def catalog_shape(agent: dict) -> dict:
    """The ``service_json`` shape (health and catalog/node): no Datacenter, null Proxy/Connect,
    the indexes (which the caller fills in)."""
    d = {k: v for k, v in agent.items() if k != "Datacenter"}
    d.setdefault("Kind", "")
    d.setdefault("TaggedAddresses", {})
    d.setdefault("Proxy", None)
    d.setdefault("Connect", None)
    return d


def agent_services(client) -> dict:
    r = client.get("/v1/agent/services")
    assert r.status_code == 200
    assert r.headers["X-Consul-ContentHash"]
    return r.get_json()


def node_id(client, node: str = NODE) -> str:
    return client.get(f"/v1/catalog/node/{node}").get_json()["Node"]["ID"]


def checks_by_id(client, service: str) -> dict:
    r = client.get(f"/v1/health/checks/{service}")
    assert r.status_code == 200
    return {c["CheckID"]: c for c in r.get_json()}


def check_status(client, check_id: str) -> str:
    checks = client.get(f"/v1/health/node/{NODE}").get_json()
    return next(c["Status"] for c in checks if c["CheckID"] == check_id)


# -- agent service registration ----------------------------------------------------------------


def test_flow_2_registration_body_verbatim(client):
    register(client, FLOW_2)
    assert agent_services(client) == {
        "web": agent_service("web", "web", Port=8080, Connect={"Proxy": {}})
    }


def test_flow_3_upstreams_body_verbatim(client):
    register(client, FLOW_3)
    # Proxy config is opaque: its keys reach the proxy exactly as written (snake_case).
    upstreams = [{"destination_name": "db", "local_bind_port": 9191}]
    assert agent_services(client) == {
        "web": agent_service(
            "web", "web", Port=8080, Connect={"Proxy": {"Config": {"upstreams": upstreams}}}
        )
    }
    # Registering the same ID again replaces it: FLOW_2 drops the upstreams.
    register(client, FLOW_2)
    assert agent_services(client)["web"]["Connect"] == {"Proxy": {}}


def test_sidecar_service_defaults(client):
    register(client, {"service": {"name": "api", "port": 9000, "connect": {"sidecar_service": {}}}})
    services = agent_services(client)
    assert set(services) == {"api", "api-sidecar-proxy"}
    assert services["api"] == agent_service("api", "api", Port=9000)
    assert services["api-sidecar-proxy"] == agent_service(
        "api-sidecar-proxy",
        "api-sidecar-proxy",
        Port=21000,
        Kind="connect-proxy",
        Proxy={
            "DestinationServiceName": "api",
            "DestinationServiceID": "api",
            "LocalServiceAddress": "127.0.0.1",
            "LocalServicePort": 9000,
        },
    )
    checks = checks_by_id(client, "api-sidecar-proxy")
    assert sorted(checks) == ["service:api-sidecar-proxy:1", "service:api-sidecar-proxy:2"]
    listening = checks["service:api-sidecar-proxy:1"]
    assert (listening["Name"], listening["Type"]) == ("Connect Sidecar Listening", "tcp")
    assert listening["Definition"] == {"TCP": "127.0.0.1:21000", "Interval": "10s"}
    alias = checks["service:api-sidecar-proxy:2"]
    assert (alias["Name"], alias["Type"]) == ("Connect Sidecar Aliasing api", "alias")
    assert alias["Definition"] == {"AliasService": "api"}

    # The sidecar is what /health/connect/api and /catalog/connect/api return for "api".
    entries = client.get("/v1/health/connect/api").get_json()
    assert [e["Service"]["ID"] for e in entries] == ["api-sidecar-proxy"]
    assert [s["ServiceID"] for s in client.get("/v1/catalog/connect/api").get_json()] == [
        "api-sidecar-proxy"
    ]

    # A second service's sidecar takes the next port; re-registering keeps the port.
    register(client, {"name": "db", "port": 5432, "connect": {"sidecar_service": {}}})
    register(client, {"service": {"name": "api", "port": 9000, "connect": {"sidecar_service": {}}}})
    services = agent_services(client)
    assert services["api-sidecar-proxy"]["Port"] == 21000
    assert services["db-sidecar-proxy"]["Port"] == 21001

    # Deregistering the parent removes its sidecar (and its checks), not the other one.
    r = client.put("/v1/agent/service/deregister/api")
    assert (r.status_code, r.get_json()) == (200, None)
    assert set(agent_services(client)) == {"db", "db-sidecar-proxy"}
    assert checks_by_id(client, "api-sidecar-proxy") == {}
    assert client.get("/v1/health/connect/api").get_json() == []


def test_sidecar_service_overrides_and_inherits(client):
    register(
        client,
        {
            "Name": "api",
            "Port": 9000,
            "Tags": ["v2"],
            "Meta": {"team": "x"},
            "Connect": {
                "SidecarService": {
                    "Port": 21999,
                    "Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]},
                }
            },
        },
    )
    sidecar = agent_services(client)["api-sidecar-proxy"]
    assert sidecar["Port"] == 21999
    assert (sidecar["Tags"], sidecar["Meta"]) == (["v2"], {"team": "x"})
    assert sidecar["Proxy"] == {
        "DestinationServiceName": "api",
        "DestinationServiceID": "api",
        "LocalServiceAddress": "127.0.0.1",
        "LocalServicePort": 9000,
        "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
    }


API_FORM = {
    "ID": "web-1",
    "Name": "web",
    "Tags": ["v1", "primary"],
    "Address": "10.0.0.5",
    "Port": 8080,
    "Meta": {"version": "1.2", "team": "frontend"},
    "Weights": {"Passing": 10, "Warning": 2},
    "EnableTagOverride": True,
    "TaggedAddresses": {
        "lan": {"Address": "10.0.0.5", "Port": 8080},
        "wan": {"Address": "198.51.100.5", "Port": 80},
    },
    "Checks": [
        {"CheckID": "web-ttl", "Name": "web ttl", "TTL": "30s", "Notes": "app pushes"},
        {
            "Name": "web http",
            "HTTP": "http://10.0.0.5:8080/health",
            "Method": "GET",
            "Header": {"X-Probe": ["1"]},
            "Interval": "10s",
            "Timeout": "1s",
        },
        {"Name": "web tcp", "TCP": "10.0.0.5:8080", "Interval": "5s", "Status": "passing"},
    ],
}


def test_api_form_registration(client):
    register(client, API_FORM)
    expected = agent_service(
        "web-1",
        "web",
        Tags=["v1", "primary"],
        Address="10.0.0.5",
        Port=8080,
        Meta={"version": "1.2", "team": "frontend"},
        Weights={"Passing": 10, "Warning": 2},
        EnableTagOverride=True,
        TaggedAddresses=API_FORM["TaggedAddresses"],
    )
    assert agent_services(client) == {"web-1": expected}

    checks = checks_by_id(client, "web")
    assert sorted(checks) == ["service:web-1:2", "service:web-1:3", "web-ttl"]
    common = {
        "Node": NODE,
        "ServiceID": "web-1",
        "ServiceName": "web",
        "ServiceTags": ["v1", "primary"],
        "Output": "",
    }
    ttl = checks["web-ttl"]
    assert {k: ttl[k] for k in common} == common
    # A new check is critical unless the registration says otherwise.
    assert (ttl["Name"], ttl["Status"], ttl["Type"], ttl["Notes"]) == (
        "web ttl",
        "critical",
        "ttl",
        "app pushes",
    )
    assert ttl["Definition"] == {"TTL": "30s"}
    http = checks["service:web-1:2"]
    assert (http["Name"], http["Status"], http["Type"]) == ("web http", "critical", "http")
    assert http["Definition"] == {
        "HTTP": "http://10.0.0.5:8080/health",
        "Method": "GET",
        "Header": {"X-Probe": ["1"]},
        "Interval": "10s",
        "Timeout": "1s",
    }
    tcp = checks["service:web-1:3"]
    assert (tcp["Name"], tcp["Status"], tcp["Type"]) == ("web tcp", "passing", "tcp")
    assert tcp["Definition"] == {"TCP": "10.0.0.5:8080", "Interval": "5s"}
    assert tcp["CreateIndex"] == tcp["ModifyIndex"] == ttl["ModifyIndex"]

    # The catalog sees the same instance, with the node's address beside it.
    (inst,) = client.get("/v1/catalog/service/web").get_json()
    assert inst == {
        "ID": node_id(client),
        "Node": NODE,
        "Address": "127.0.0.1",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
        "NodeMeta": {},
        "ServiceID": "web-1",
        "ServiceName": "web",
        "ServiceTags": ["v1", "primary"],
        "ServiceAddress": "10.0.0.5",
        "ServicePort": 8080,
        "ServiceMeta": {"version": "1.2", "team": "frontend"},
        "ServiceTaggedAddresses": API_FORM["TaggedAddresses"],
        "ServiceWeights": {"Passing": 10, "Warning": 2},
        "ServiceEnableTagOverride": True,
        "ServiceKind": "",
        "ServiceProxy": None,
        "ServiceConnect": None,
        "CreateIndex": inst["CreateIndex"],
        "ModifyIndex": inst["CreateIndex"],
    }


def test_single_check_and_snake_case_check(client):
    register(client, {"Name": "a", "Port": 1, "Check": {"TTL": "10s"}})
    register(
        client,
        {"name": "b", "port": 2, "check": {"check_id": "b-tcp", "tcp": "b:2", "interval": "3s"}},
    )
    a = checks_by_id(client, "a")
    assert list(a) == ["service:a"]
    assert (a["service:a"]["Name"], a["service:a"]["Type"]) == ("Service 'a' check", "ttl")
    b = checks_by_id(client, "b")
    assert b["b-tcp"]["Definition"] == {"TCP": "b:2", "Interval": "3s"}


def test_connect_proxy_kind_and_connect_native(client):
    register(client, {"ID": "web-1", "Name": "web", "Port": 8080})
    proxy = {
        "DestinationServiceName": "web",
        "DestinationServiceID": "web-1",
        "LocalServiceAddress": "127.0.0.1",
        "LocalServicePort": 8080,
        "Upstreams": [
            {"DestinationName": "db", "LocalBindPort": 9191},
            {"DestinationType": "service", "DestinationName": "cache", "LocalBindPort": 9192},
        ],
    }
    register(client, {"Name": "web-proxy", "Kind": "connect-proxy", "Port": 21500, "Proxy": proxy})
    register(client, {"Name": "native", "Port": 7000, "Connect": {"Native": True}})

    services = agent_services(client)
    assert services["web-proxy"] == agent_service(
        "web-proxy", "web-proxy", Port=21500, Kind="connect-proxy", Proxy=proxy
    )
    assert services["native"] == agent_service(
        "native", "native", Port=7000, Connect={"Native": True}
    )

    # /catalog/connect and /health/connect: the proxies of a service, or the service itself
    # when it is Connect-native; never the plain instances.
    assert [s["ServiceID"] for s in client.get("/v1/catalog/connect/web").get_json()] == [
        "web-proxy"
    ]
    (proxy_inst,) = client.get("/v1/catalog/connect/web").get_json()
    assert (proxy_inst["ServiceKind"], proxy_inst["ServiceProxy"]) == ("connect-proxy", proxy)
    assert [e["Service"]["ID"] for e in client.get("/v1/health/connect/web").get_json()] == [
        "web-proxy"
    ]
    assert [s["ServiceID"] for s in client.get("/v1/catalog/connect/native").get_json()] == [
        "native"
    ]
    (native,) = client.get("/v1/health/connect/native").get_json()
    assert native["Service"]["Connect"] == {"Native": True}
    assert client.get("/v1/health/connect/nothing").get_json() == []
    # The plain service lists only the plain instance.
    assert [s["ServiceID"] for s in client.get("/v1/catalog/service/web").get_json()] == ["web-1"]


def test_get_one_agent_service(client):
    register(client, FLOW_2)
    r = client.get("/v1/agent/service/web")
    assert r.status_code == 200
    body = r.get_json()
    h = r.headers["X-Consul-ContentHash"]
    assert body == {
        **agent_service("web", "web", Port=8080, Connect={"Proxy": {}}),
        "ContentHash": h,
    }
    # The hash is stable while nothing changes, and changes with the service.
    assert client.get("/v1/agent/service/web").headers["X-Consul-ContentHash"] == h
    register(client, {"service": {"name": "web", "port": 8081}})
    assert client.get("/v1/agent/service/web").headers["X-Consul-ContentHash"] != h
    assert_error(client.get("/v1/agent/service/nope"), 404, "not_found", "nope")


def test_deregister_removes_service_and_checks(client):
    register(client, API_FORM)
    assert client.put("/v1/agent/service/deregister/web-1").status_code == 200
    assert agent_services(client) == {}
    assert client.get("/v1/catalog/service/web").get_json() == []
    assert checks_by_id(client, "web") == {}
    # A second time, it is unknown: 404, as for an ID never registered.
    assert_error(client.put("/v1/agent/service/deregister/web-1"), 404, "not_found", "web-1")
    assert_error(client.put("/v1/agent/service/deregister/ghost"), 404, "not_found", "ghost")


def test_replace_existing_checks(client):
    register(client, {"Name": "a", "Checks": [{"CheckID": "c1", "TTL": "5s"}]})
    r = put_json(client, "/v1/agent/service/register?replace-existing-checks", {"Name": "a"})
    assert r.status_code == 200
    assert checks_by_id(client, "a") == {}
    register(client, {"Name": "b", "Checks": [{"CheckID": "c2", "TTL": "5s"}]})
    register(client, {"Name": "b"})  # without the flag, the check stays
    assert list(checks_by_id(client, "b")) == ["c2"]


# -- catalog -----------------------------------------------------------------------------------

EXT = {
    "Node": "ext-1",
    "Address": "192.0.2.10",
    "NodeMeta": {"rack": "r1"},
    "TaggedAddresses": {"wan": "198.51.100.10"},
    "Service": {"ID": "redis-1", "Service": "redis", "Tags": ["primary"], "Port": 6379},
    "Check": {
        "CheckID": "redis-alive",
        "Name": "Redis alive",
        "Status": "passing",
        "ServiceID": "redis-1",
    },
}


def test_catalog_register_node_service_check(client):
    before = current_index(client)
    catalog_register(client, EXT)
    idx = current_index(client)
    assert idx == before + 1

    r = client.get("/v1/catalog/nodes")
    assert r.status_code == 200
    nodes = r.get_json()
    assert [n["Node"] for n in nodes] == ["ext-1", NODE]
    ext = nodes[0]
    assert ext == {
        "ID": ext["ID"],
        "Node": "ext-1",
        "Address": "192.0.2.10",
        "Datacenter": "dc1",
        "TaggedAddresses": {"wan": "198.51.100.10"},
        "Meta": {"rack": "r1"},
        "CreateIndex": idx,
        "ModifyIndex": idx,
    }
    assert len(ext["ID"]) == 36  # a UUID is given to a node registered without one
    assert index_of(r) == idx

    r = client.get("/v1/catalog/node/ext-1")
    assert r.get_json() == {
        "Node": ext,
        "Services": {
            "redis-1": {
                **catalog_shape(agent_service("redis-1", "redis", Tags=["primary"], Port=6379)),
                "CreateIndex": idx,
                "ModifyIndex": idx,
            }
        },
    }
    assert index_of(r) == idx

    r = client.get("/v1/catalog/services")
    assert r.get_json() == {"redis": ["primary"], "consul": []}  # consul: the server itself
    assert index_of(r) == idx

    (inst,) = client.get("/v1/catalog/service/redis").get_json()
    assert (inst["Node"], inst["Address"], inst["ServiceAddress"], inst["ServicePort"]) == (
        "ext-1",
        "192.0.2.10",
        "",
        6379,
    )
    assert inst["NodeMeta"] == {"rack": "r1"}

    (entry,) = client.get("/v1/health/service/redis").get_json()
    assert [c["CheckID"] for c in entry["Checks"]] == ["redis-alive"]
    assert entry["Checks"][0]["Status"] == "passing"


def test_catalog_service_tag_filter_and_services_tags(client):
    catalog_register(client, EXT)
    catalog_register(
        client,
        {
            "Node": "ext-2",
            "Address": "192.0.2.11",
            "Service": {"ID": "redis-2", "Service": "redis", "Tags": ["replica", "v7"]},
        },
    )
    assert client.get("/v1/catalog/services").get_json() == {
        "redis": ["primary", "replica", "v7"],
        "consul": [],
    }

    def ids(url):
        return [s["ServiceID"] for s in client.get(url).get_json()]

    assert ids("/v1/catalog/service/redis") == ["redis-1", "redis-2"]
    assert ids("/v1/catalog/service/redis?tag=primary") == ["redis-1"]
    assert ids("/v1/catalog/service/redis?tag=replica&tag=v7") == ["redis-2"]
    assert ids("/v1/catalog/service/redis?tag=primary&tag=v7") == []
    assert ids("/v1/catalog/service/redis?tag=nope") == []
    r = client.get("/v1/catalog/service/unknown")
    assert (r.status_code, r.get_json()) == (200, [])
    assert index_of(r) >= 1


def test_catalog_node_of_the_agent_and_an_unknown_node(client):
    r = client.get("/v1/catalog/node/nowhere")
    assert (r.status_code, r.get_json()) == (200, None)
    assert index_of(r) >= 1
    register(client, FLOW_2)
    body = client.get(f"/v1/catalog/node/{NODE}").get_json()
    assert body["Node"]["Node"] == NODE
    assert body["Node"]["Address"] == "127.0.0.1"
    web = body["Services"]["web"]
    assert web == {
        **catalog_shape(agent_service("web", "web", Port=8080, Connect={"Proxy": {}})),
        "CreateIndex": web["CreateIndex"],
        "ModifyIndex": web["CreateIndex"],
    }


def test_catalog_deregister_check_service_node(client):
    catalog_register(client, EXT)
    catalog_register(
        client,
        {
            "Node": "ext-1",
            "Address": "192.0.2.10",
            "NodeMeta": {"rack": "r1"},
            "TaggedAddresses": {"wan": "198.51.100.10"},
            "Check": {"CheckID": "mem", "Name": "Memory", "Status": "warning"},
        },
    )
    assert [c["CheckID"] for c in client.get("/v1/health/node/ext-1").get_json()] == [
        "mem",
        "redis-alive",
    ]

    r = put_json(client, "/v1/catalog/deregister", {"Node": "ext-1", "CheckID": "mem"})
    assert (r.status_code, r.get_json()) == (200, True)
    assert [c["CheckID"] for c in client.get("/v1/health/node/ext-1").get_json()] == ["redis-alive"]

    r = put_json(client, "/v1/catalog/deregister", {"Node": "ext-1", "ServiceID": "redis-1"})
    assert (r.status_code, r.get_json()) == (200, True)
    assert client.get("/v1/catalog/service/redis").get_json() == []
    assert client.get("/v1/health/node/ext-1").get_json() == []
    assert client.get("/v1/catalog/node/ext-1").get_json()["Services"] == {}

    r = put_json(client, "/v1/catalog/deregister", {"Node": "ext-1"})
    assert (r.status_code, r.get_json()) == (200, True)
    assert client.get("/v1/catalog/node/ext-1").get_json() is None
    assert [n["Node"] for n in client.get("/v1/catalog/nodes").get_json()] == [NODE]
    # Deregistering what is not there is not an error (Consul answers true too).
    r = put_json(client, "/v1/catalog/deregister", {"Node": "ext-1"})
    assert (r.status_code, r.get_json()) == (200, True)


def test_catalog_register_check_for_unknown_service_is_400(client):
    body = {"Node": "n", "Address": "a", "Check": {"Name": "c", "ServiceID": "ghost"}}
    assert_error(put_json(client, "/v1/catalog/register", body), 400, "bad_request", "ghost")
    assert client.get("/v1/catalog/node/n").get_json() is None


def test_datacenters_and_other_dc(client, subtests):
    r = client.get("/v1/catalog/datacenters")
    assert (r.status_code, r.get_json()) == (200, ["dc1"])
    for url in (
        "/v1/catalog/services",
        "/v1/catalog/nodes",
        "/v1/catalog/service/web",
        "/v1/catalog/connect/web",
        f"/v1/catalog/node/{NODE}",
        "/v1/health/service/web",
        "/v1/health/connect/web",
        "/v1/health/checks/web",
        f"/v1/health/node/{NODE}",
        "/v1/health/state/any",
    ):
        with subtests.test(url=url):
            assert client.get(url + "?dc=dc1").status_code == 200
            assert_error(client.get(url + "?dc=dc2"), 400, "bad_request", "dc2")
    with subtests.test("register"):
        r = put_json(client, "/v1/catalog/register?dc=dc2", EXT)
        assert_error(r, 400, "bad_request", "dc2")
        r = put_json(client, "/v1/catalog/register", {**EXT, "Datacenter": "dc2"})
        assert_error(r, 400, "bad_request", "dc2")
        r = put_json(client, "/v1/catalog/deregister?dc=dc2", {"Node": NODE})
        assert_error(r, 400, "bad_request", "dc2")
        assert client.get("/v1/catalog/node/ext-1").get_json() is None
        assert client.get(f"/v1/catalog/node/{NODE}").get_json() is not None


# -- health ------------------------------------------------------------------------------------


def test_health_service_passing_and_tag(client):
    register(client, {"ID": "web-1", "Name": "web", "Tags": ["a"], "Check": {"TTL": "1h"}})
    register(client, {"ID": "web-2", "Name": "web", "Tags": ["b"], "Check": {"TTL": "1h"}})
    assert client.put("/v1/agent/check/pass/service:web-2").status_code == 200

    r = client.get("/v1/health/service/web")
    assert r.status_code == 200
    entries = r.get_json()
    assert [e["Service"]["ID"] for e in entries] == ["web-1", "web-2"]
    e1 = entries[0]
    assert e1["Node"]["Node"] == NODE
    assert e1["Service"] == {
        **catalog_shape(agent_service("web-1", "web", Tags=["a"])),
        "CreateIndex": e1["Service"]["CreateIndex"],
        "ModifyIndex": e1["Service"]["ModifyIndex"],
    }
    # Node checks first, then the service's own (with its tags).
    assert [(c["CheckID"], c["Status"], c["ServiceTags"]) for c in e1["Checks"]] == [
        (SERF, "passing", []),
        ("service:web-1", "critical", ["a"]),
    ]
    assert index_of(r) == current_index(client)

    def ids(url):
        return [e["Service"]["ID"] for e in client.get(url).get_json()]

    assert ids("/v1/health/service/web?passing") == ["web-2"]
    assert ids("/v1/health/service/web?passing=true") == ["web-2"]
    assert ids("/v1/health/service/web?passing=false") == ["web-1", "web-2"]
    assert ids("/v1/health/service/web?tag=a") == ["web-1"]
    assert ids("/v1/health/service/web?tag=b&passing") == ["web-2"]
    assert ids("/v1/health/service/web?tag=a&passing") == []
    # A warning is not passing either; a failing node check fails every instance on it.
    client.put("/v1/agent/check/warn/service:web-2")
    assert ids("/v1/health/service/web?passing") == []
    client.put("/v1/agent/check/pass/service:web-1")
    client.put("/v1/agent/check/pass/service:web-2")
    assert ids("/v1/health/service/web?passing") == ["web-1", "web-2"]
    client.put(f"/v1/agent/check/fail/{SERF}")
    assert ids("/v1/health/service/web?passing") == []
    assert ids("/v1/health/service/nothing") == []


def test_health_checks_node_and_state(client, subtests):
    register(client, {"ID": "web-1", "Name": "web", "Tags": ["t"], "Check": {"TTL": "1h"}})
    register(client, {"ID": "db-1", "Name": "db", "Check": {"TTL": "1h"}})
    client.put("/v1/agent/check/warn/service:db-1")

    checks = client.get("/v1/health/checks/web").get_json()
    assert [(c["CheckID"], c["ServiceName"], c["ServiceTags"]) for c in checks] == [
        ("service:web-1", "web", ["t"])
    ]
    assert client.get("/v1/health/checks/nothing").get_json() == []

    r = client.get(f"/v1/health/node/{NODE}")
    assert [c["CheckID"] for c in r.get_json()] == [SERF, "service:db-1", "service:web-1"]
    assert index_of(r) >= 1
    assert client.get("/v1/health/node/nowhere").get_json() == []

    def state(s):
        r = client.get(f"/v1/health/state/{s}")
        assert r.status_code == 200
        return sorted(c["CheckID"] for c in r.get_json())

    assert state("any") == sorted([SERF, "service:db-1", "service:web-1"])
    assert state("passing") == [SERF]
    assert state("warning") == ["service:db-1"]
    assert state("critical") == ["service:web-1"]
    for bad in ("bogus", "PASSING", "maintenance", "all"):
        with subtests.test(state=bad):
            assert_error(client.get(f"/v1/health/state/{bad}"), 400, "bad_request", bad)


def test_agent_check_pass_warn_fail_update(client, subtests):
    register(client, {"ID": "web-1", "Name": "web", "Check": {"TTL": "1h"}})
    cid = "service:web-1"

    def check():
        return checks_by_id(client, "web")[cid]

    for verb, status in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
        with subtests.test(verb=verb):
            r = client.put(f"/v1/agent/check/{verb}/{cid}?note=because+{verb}")
            assert (r.status_code, r.get_json()) == (200, None)
            c = check()
            assert (c["Status"], c["Output"]) == (status, f"because {verb}")

    with subtests.test("pass without a note keeps the output"):
        client.put(f"/v1/agent/check/pass/{cid}")
        assert (check()["Status"], check()["Output"]) == ("passing", "because fail")

    with subtests.test("update"):
        r = put_json(client, f"/v1/agent/check/update/{cid}", {"Status": "warning", "Output": "hi"})
        assert (r.status_code, r.get_json()) == (200, None)
        assert (check()["Status"], check()["Output"]) == ("warning", "hi")
        # snake_case body, as the Go client's config form sends it
        r = put_json(client, f"/v1/agent/check/update/{cid}", {"status": "critical"})
        assert (check()["Status"], check()["Output"]) == ("critical", "hi")
        # no body at all means passing, as in Consul
        assert client.put(f"/v1/agent/check/update/{cid}").status_code == 200
        assert check()["Status"] == "passing"

    with subtests.test("long output is truncated"):
        put_json(client, f"/v1/agent/check/update/{cid}", {"Output": "x" * 5000})
        assert check()["Output"] == "x" * 4096 + " ... (Output exceeded 4096 bytes)"

    with subtests.test("bad update bodies"):
        for body in (
            {"Status": "bogus"},
            {"Status": 1},
            {"Output": 5},
            {"Status": "passing", "Extra": 1},
            [],
        ):
            r = put_json(client, f"/v1/agent/check/update/{cid}", body)
            assert_error(r, 400, "bad_request")

    for verb in ("pass", "warn", "fail", "update"):
        with subtests.test(unknown=verb):
            r = client.put(f"/v1/agent/check/{verb}/nope")
            assert_error(r, 404, "not_found", "nope")


def test_check_update_bumps_the_index_only_on_change(client):
    register(client, {"ID": "web-1", "Name": "web", "Check": {"TTL": "1h"}})
    client.put("/v1/agent/check/pass/service:web-1")
    idx = current_index(client)
    # Same status and output: a TTL refresh, not a change (no wake-up of every watcher).
    client.put("/v1/agent/check/pass/service:web-1")
    assert current_index(client) == idx
    client.put("/v1/agent/check/pass/service:web-1?note=new")
    assert current_index(client) == idx + 1


def test_ttl_check_not_refreshed_turns_critical(make_client):
    client = make_client(ttl_check_interval=0.05)
    register(client, {"ID": "web-1", "Name": "web", "Check": {"CheckID": "t", "TTL": "1s"}})
    assert check_status(client, "t") == "critical"
    client.put("/v1/agent/check/pass/t")
    assert check_status(client, "t") == "passing"
    # Refreshing within the TTL keeps it passing past the first deadline (the short sleeps
    # are what is being tested: 3 x 0.4 s > the 1 s TTL)...
    for _ in range(3):
        time.sleep(0.4)
        client.put("/v1/agent/check/pass/t")
        assert check_status(client, "t") == "passing"
    # ...and once the refreshes stop, it turns critical after about a TTL.
    wait_until(lambda: check_status(client, "t") == "critical", timeout=5)
    c = checks_by_id(client, "web")["t"]
    assert (c["Status"], c["Output"]) == ("critical", "TTL expired")
    # And a refresh brings it back.
    client.put("/v1/agent/check/pass/t")
    assert check_status(client, "t") == "passing"


# -- status and self ---------------------------------------------------------------------------


def test_status_leader_and_peers(client):
    r = client.get("/v1/status/leader")
    assert (r.status_code, r.mimetype, r.get_json()) == (200, "application/json", "127.0.0.1:8300")
    r = client.get("/v1/status/peers")
    assert (r.status_code, r.get_json()) == (200, ["127.0.0.1:8300"])
    # ?pretty indents, as Consul does.
    r = client.get("/v1/status/peers?pretty")
    assert r.get_data(as_text=True) == '[\n    "127.0.0.1:8300"\n]\n'


def test_agent_self(client, store_kind):
    register(client, API_FORM)
    r = client.get("/v1/agent/self")
    assert r.status_code == 200
    body = r.get_json()
    # No xDS section: Trellis serves no xDS (Consul leaves it out without gRPC too).
    assert set(body) == {"Config", "DebugConfig", "Member", "Meta", "Stats"}
    cfg = body["Config"]
    assert cfg == {
        "Datacenter": "dc1",
        "NodeName": NODE,
        "NodeID": node_id(client),
        "Server": True,
        "Revision": "",
        "Version": cfg["Version"],
        "Domain": "trellis.",
        "PrimaryDatacenter": "dc1",
        "SessionTTLMin": 10 * 10**9,  # nanoseconds, as Consul (Patroni reads it)
    }
    assert cfg["Version"]
    assert body["Member"] == {
        "Name": NODE,
        "Addr": "127.0.0.1",
        "Port": 8500,
        "Tags": {"role": "consul", "dc": "dc1", "build": cfg["Version"]},
        "Status": 1,
    }
    assert body["Meta"] == {}
    stats = body["Stats"]
    assert stats["agent"] == {"checks": "4", "services": "1"}
    assert stats["store"] == {"backend": store_kind, "index": str(current_index(client))}
    assert stats["blocking"] == {"waiting": "0"}
    assert stats["consul"]["leader_addr"] == client.get("/v1/status/leader").get_json()
    debug = body["DebugConfig"]
    assert (debug["Datacenter"], debug["NodeName"], debug["NodeID"]) == ("dc1", NODE, cfg["NodeID"])
    assert debug["ServerMode"] is True and debug["GRPCPort"] == -1
    # agent/members holds the same entry for this node as agent/self's Member.
    own = [m for m in client.get("/v1/agent/members").get_json() if m["Name"] == NODE]
    assert own == [body["Member"]]
