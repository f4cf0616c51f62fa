"""Catalog details Consul's clients rely on (issue 15, item 4): the servers as the ``consul``
service, ``catalog/node-services``, ``health/ingress`` and ``catalog/gateway-services``, and
``?peer=`` refused rather than ignored. Both stores (``client``), and a real ``trellis
server`` for what its start and stop do."""

from __future__ import annotations

import httpx

from tests import api_fixtures
from tests.api_fixtures import InThread, assert_error, index_of, parked, wait_until
from tests.support import TrellisProcess, server_args
from trellis.api.store import open_store

client = api_fixtures.client
make_client = api_fixtures.make_client
NODE = api_fixtures.NODE


def ok(resp, status: int = 200):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    return resp


def register(c, body: dict):
    return ok(c.put("/v1/agent/service/register", json=body))


# -- the consul service ---------------------------------------------------------------------


def test_the_server_is_the_consul_service_with_a_passing_node_check(client):
    """Clients find the servers by looking up ``consul``: it was not in the catalog at all."""
    (inst,) = ok(client.get("/v1/catalog/service/consul")).get_json()
    assert (inst["Node"], inst["ServiceID"], inst["ServiceName"]) == (NODE, "consul", "consul")
    assert inst["ServicePort"] == 8500  # the HTTP API's port (the settings' default)
    assert inst["ServiceTags"] == []  # clients compare catalog/services with {"consul": []}
    assert inst["ServiceMeta"]["implementation"] == "trellis"
    assert ok(client.get("/v1/catalog/services")).get_json() == {"consul": []}
    (entry,) = ok(client.get("/v1/health/service/consul?passing")).get_json()
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth"]
    # The catalog's entry, not an agent registration: agent/services does not list it.
    assert ok(client.get("/v1/agent/services")).get_json() == {}


def test_a_removed_consul_service_is_put_back(make_client):
    c = make_client(ttl_check_interval=0.05)
    ok(c.put("/v1/catalog/deregister", json={"Node": NODE, "ServiceID": "consul"}))

    def back() -> bool:
        return len(ok(c.get("/v1/catalog/service/consul")).get_json()) == 1

    wait_until(back, timeout=30)


def test_a_server_registers_its_api_port_and_leaves_on_a_graceful_stop(tmp_path):
    data = tmp_path / "data"
    server = TrellisProcess(server_args(data, workers=1, node="srv-1")).start()
    try:
        port = int(server.url.rsplit(":", 1)[1])
        (inst,) = httpx.get(server.url + "/v1/catalog/service/consul", timeout=10).json()
        # -http-port 0: the port the server bound, not 0.
        assert (inst["Node"], inst["ServicePort"]) == ("srv-1", port)
    finally:
        assert server.stop() == 0, server.output()
    store = open_store("sqlite:///" + str(data / "trellis.db"))
    try:
        assert store.services(name="consul") == []
        assert store.node("srv-1") is not None  # the node stays; only the service left
    finally:
        store.close()


# -- node-services, ingress, gateway-services ----------------------------------------------------


def test_node_services_is_the_node_with_a_list_and_filters_each_service(client):
    register(client, {"Name": "web", "ID": "web-1", "Port": 80, "Tags": ["v1"]})
    register(client, {"Name": "db", "Port": 5432})
    r = ok(client.get(f"/v1/catalog/node-services/{NODE}"))
    body = r.get_json()
    assert body["Node"]["Node"] == NODE
    assert sorted(s["ID"] for s in body["Services"]) == ["consul", "db", "web-1"]
    web = next(s for s in body["Services"] if s["ID"] == "web-1")
    assert (web["Service"], web["Port"], web["Tags"]) == ("web", 80, ["v1"])
    assert index_of(r) >= 1
    r = ok(client.get(f"/v1/catalog/node-services/{NODE}", query_string={"filter": "v1 in Tags"}))
    assert [s["ID"] for s in r.get_json()["Services"]] == ["web-1"]
    assert ok(client.get("/v1/catalog/node-services/nobody")).get_json() == {
        "Node": None,
        "Services": [],
    }


def test_node_services_blocks_until_the_node_changes(client):
    idx = index_of(ok(client.get(f"/v1/catalog/node-services/{NODE}")))
    url = f"/v1/catalog/node-services/{NODE}?index={idx}&wait=20s"
    q = InThread(lambda: client.get(url)).start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done()
    register(client, {"Name": "late", "Port": 1})
    r = ok(q.result())
    assert index_of(r) > idx
    assert "late" in [s["Service"] for s in r.get_json()["Services"]]


def test_ingress_and_gateway_services_are_empty_blocking_reads(client):
    register(client, {"Name": "web", "Port": 80})
    r = ok(client.get("/v1/health/ingress/web"))
    assert r.get_json() == []
    idx = index_of(r)
    # The filter is evaluated (a bad one is a 400), and an empty list stays empty.
    ok(client.get("/v1/health/ingress/web", query_string={"filter": "Node.Node != ``"}))
    assert_error(
        client.get("/v1/health/ingress/web", query_string={"filter": "Nope == 1"}),
        400,
        "bad_request",
        "Nope",
    )
    r = ok(client.get("/v1/catalog/gateway-services/ingress-1"))
    assert r.get_json() == []
    assert index_of(r) >= 1
    # Blocking: parked until the service's index moves.
    q = InThread(lambda: client.get(f"/v1/health/ingress/web?index={idx}&wait=20s")).start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done()
    register(client, {"Name": "web", "Port": 81})
    r = ok(q.result())
    assert (r.get_json(), index_of(r) > idx) == ([], True)


# -- ?peer= -------------------------------------------------------------------------------------


PEERED = [
    "/v1/catalog/service/web",
    "/v1/catalog/connect/web",
    "/v1/catalog/services",
    "/v1/catalog/nodes",
    f"/v1/catalog/node/{NODE}",
    f"/v1/catalog/node-services/{NODE}",
    "/v1/health/service/web",
    "/v1/health/connect/web",
    "/v1/health/checks/web",
    f"/v1/health/node/{NODE}",
    "/v1/health/state/any",
]


def test_a_peer_is_answered_as_an_unknown_one_not_ignored(client, subtests):
    """``?peer=`` was ignored: the answer was this cluster's instances, as if they were the
    peer's. Trellis has no cluster peering, so every peer is one it does not know, and a read
    answers as Consul answers an unknown peer: with nothing. An empty one is the local
    cluster, as in Consul; a write naming a peer is a 400."""
    register(client, {"Name": "web", "Port": 80})
    for path in PEERED:
        with subtests.test(path=path):
            r = client.get(path, query_string={"peer": "other"})
            assert r.status_code == 200, r.get_data(as_text=True)
            assert r.headers["X-Consul-Index"] == "1"
            assert r.get_json() in ([], {}, None, {"Node": None, "Services": []}), r.get_json()
            ok(client.get(path, query_string={"peer": ""}))
    # The instance is this cluster's, and only this cluster's.
    assert len(ok(client.get("/v1/catalog/service/web", query_string={"peer": ""})).get_json()) == 1
    assert (
        ok(client.get("/v1/catalog/service/web", query_string={"peer": "other"})).get_json() == []
    )
    r = client.put("/v1/catalog/register?peer=other", json={"Node": NODE, "Address": "1"})
    assert_error(r, 400, "bad_request", "Trellis has no cluster peering")
