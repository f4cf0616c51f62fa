"""Coordinates and the Raft configuration through the HTTP API, on SQLite and PostgreSQL.

Trellis has no gossip and no Raft (api/views/coordinate.py): no coordinates, an update
refused, and the Raft configuration naming this server alone, as ``/v1/status`` does.
"""

from __future__ import annotations

import time

from tests import api_fixtures
from tests.api_fixtures import NODE, assert_error, index_of

client = api_fixtures.client
make_client = api_fixtures.make_client


def test_no_coordinates_anywhere(client):
    assert client.get("/v1/coordinate/datacenters").get_json() == [
        {"Datacenter": "dc1", "AreaID": "wan", "Coordinates": []}
    ]
    r = client.get("/v1/coordinate/nodes")
    assert r.get_json() == [] and index_of(r) == 1
    # Nothing ever changes them: a blocking read waits out its wait, then answers the same.
    started = time.monotonic()
    r = client.get("/v1/coordinate/nodes?index=1&wait=200ms")
    assert r.get_json() == [] and index_of(r) == 1
    assert time.monotonic() - started >= 0.2
    r = client.get(f"/v1/coordinate/node/{NODE}")
    assert_error(r, 404, contains="no coordinates")
    assert index_of(r) == 1  # Consul's 404 carries the index (py-consul reads it)
    assert_error(client.get("/v1/coordinate/node/elsewhere"), 404, contains="no node")
    assert_error(client.get("/v1/coordinate/nodes?dc=dc9"), 400)


def test_an_update_is_refused_and_stores_nothing(client):
    before = client.get("/v1/agent/self").get_json()["Stats"]["store"]["index"]
    body = {"Node": NODE, "Coord": {"Vec": [0.1] * 8, "Error": 1.5, "Adjustment": 0, "Height": 0}}
    assert_error(client.put("/v1/coordinate/update", json=body), 400, contains="no network")
    assert client.get("/v1/coordinate/nodes").get_json() == []
    assert client.get("/v1/agent/self").get_json()["Stats"]["store"]["index"] == before


def test_the_raft_configuration_is_this_server_as_status_says(client):
    r = client.get("/v1/operator/raft/configuration")
    body = r.get_json()
    [server] = body["Servers"]
    assert server["Address"] == client.get("/v1/status/leader").get_json()
    assert client.get("/v1/status/peers").get_json() == [server["Address"]]
    assert (server["Node"], server["Leader"], server["Voter"]) == (NODE, True, True)
    assert server["ID"] == client.get(f"/v1/catalog/node/{NODE}").get_json()["Node"]["ID"]
    assert server["ProtocolVersion"] == ""  # no Raft protocol to name
    index = body["Index"]
    assert client.put("/v1/kv/x", data=b"1").get_json() is True
    later = client.get("/v1/operator/raft/configuration").get_json()["Index"]
    assert later > index  # the store's write index
