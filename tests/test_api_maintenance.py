"""Maintenance mode on the server's agent endpoints (``PUT /v1/agent/maintenance``,
``PUT /v1/agent/service/maintenance/{id}``), on SQLite and on PostgreSQL: Consul's critical
``_node_maintenance`` / ``_service_maintenance:{id}`` check with the reason as its notes,
which takes the node's (or the one service's) instances out of passing health and DNS."""

from __future__ import annotations

from dnslib import QTYPE, DNSRecord

from tests import api_fixtures
from tests.api_fixtures import NODE, assert_error, register
from trellis.api import maintenance as maint
from trellis.api.dns import answer

client = api_fixtures.client
make_client = api_fixtures.make_client


def _checks(client) -> dict:
    return client.get("/v1/agent/checks").get_json()


def _passing(client, name: str) -> list[str]:
    r = client.get(f"/v1/health/service/{name}?passing")
    assert r.status_code == 200
    return sorted(e["Service"]["ID"] for e in r.get_json())


def _dns_addresses(client, name: str) -> set[str]:
    svc = client.application.extensions["trellis"]
    q = DNSRecord.question(f"{name}.service.{svc.settings.domain_fqdn}", "A").pack()
    reply = DNSRecord.parse(answer(svc.store, svc.settings, q))
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}


def _setup(client) -> None:
    register(client, {"Name": "web", "ID": "web-1", "Port": 80, "Address": "10.0.0.1"})
    register(client, {"Name": "web", "ID": "web-2", "Port": 81, "Address": "10.0.0.2"})
    register(client, {"Name": "db", "ID": "db-1", "Port": 5432, "Address": "10.0.0.3"})


def test_service_maintenance_takes_one_instance_out_and_back(client):
    _setup(client)
    assert _passing(client, "web") == ["web-1", "web-2"]
    assert _dns_addresses(client, "web") == {"10.0.0.1", "10.0.0.2"}
    r = client.put("/v1/agent/service/maintenance/web-1?enable=true&reason=upgrading+to+v2")
    assert r.status_code == 200 and r.get_json() is None
    check = _checks(client)["_service_maintenance:web-1"]
    assert check["Name"] == "Service Maintenance Mode"
    assert check["Status"] == "critical"
    assert check["Notes"] == "upgrading to v2"
    assert (check["ServiceID"], check["ServiceName"], check["Type"]) == (
        "web-1",
        "web",
        "maintenance",
    )
    assert _passing(client, "web") == ["web-2"]
    assert _passing(client, "db") == ["db-1"]
    assert _dns_addresses(client, "web") == {"10.0.0.2"}

    assert client.put("/v1/agent/service/maintenance/web-1?enable=false").status_code == 200
    assert "_service_maintenance:web-1" not in _checks(client)
    assert _passing(client, "web") == ["web-1", "web-2"]
    assert _dns_addresses(client, "web") == {"10.0.0.1", "10.0.0.2"}


def test_node_maintenance_takes_every_service_of_the_node_out(client):
    _setup(client)
    assert client.put("/v1/agent/maintenance?enable=1").status_code == 200
    check = _checks(client)[maint.NODE_CHECK_ID]
    assert check["Name"] == "Node Maintenance Mode" and check["Status"] == "critical"
    assert check["ServiceID"] == "" and check["Node"] == NODE
    # No reason: Consul's default message.
    assert check["Notes"] == maint.DEFAULT_NODE_REASON
    assert _passing(client, "web") == [] and _passing(client, "db") == []
    assert _dns_addresses(client, "web") == set()
    # The instances are still registered: only their health changed.
    assert len(client.get("/v1/catalog/service/web").get_json()) == 2

    assert client.put("/v1/agent/maintenance?enable=false").status_code == 200
    assert maint.NODE_CHECK_ID not in _checks(client)
    assert _passing(client, "db") == ["db-1"]


def test_enabling_twice_keeps_the_first_reason_and_disabling_twice_is_fine(client):
    _setup(client)
    assert client.put("/v1/agent/maintenance?enable=true&reason=first").status_code == 200
    assert client.put("/v1/agent/maintenance?enable=true&reason=second").status_code == 200
    assert _checks(client)[maint.NODE_CHECK_ID]["Notes"] == "first"
    for _ in range(2):
        assert client.put("/v1/agent/maintenance?enable=false").status_code == 200
    assert maint.NODE_CHECK_ID not in _checks(client)


def test_service_maintenance_check_goes_with_its_service(client):
    _setup(client)
    assert client.put("/v1/agent/service/maintenance/db-1?enable=true").status_code == 200
    assert _checks(client)["_service_maintenance:db-1"]["Notes"] == maint.DEFAULT_SERVICE_REASON
    assert client.put("/v1/agent/service/deregister/db-1").status_code == 200
    assert "_service_maintenance:db-1" not in _checks(client)


def test_bad_requests_are_400_or_404_and_change_nothing(client, subtests):
    _setup(client)
    before = _checks(client)
    cases = [
        ("/v1/agent/maintenance", 400, "Missing value for enable"),
        ("/v1/agent/maintenance?enable=", 400, "Missing value for enable"),
        ("/v1/agent/maintenance?enable=yes", 400, "Invalid value for enable"),
        ("/v1/agent/maintenance?enable=true&reason=a%00b", 400, "control characters"),
        ("/v1/agent/maintenance?enable=true&reason=" + "x" * 2000, 400, "longer than"),
        ("/v1/agent/service/maintenance/web-1", 400, "Missing value for enable"),
        ("/v1/agent/service/maintenance/nothing?enable=true", 404, "nothing"),
    ]
    for url, status, contains in cases:
        with subtests.test(url=url[:60]):
            assert_error(client.put(url), status, contains=contains)
    assert _checks(client) == before
    assert client.get("/v1/agent/maintenance?enable=true").status_code == 405


def test_service_maintenance_of_an_id_with_a_slash(client):
    # Patroni's IDs are scope/name: the rest of the path is the ID, sent as is or encoded, as
    # on the deregister and check paths.
    register(client, {"Name": "pgha", "ID": "pgha/pg1", "Port": 5432, "Address": "10.0.0.1"})
    for path in ("pgha/pg1", "pgha%2Fpg1"):
        r = client.put(f"/v1/agent/service/maintenance/{path}?enable=true&reason=r")
        assert r.status_code == 200, r.get_data(as_text=True)
        assert _checks(client)["_service_maintenance:pgha/pg1"]["Notes"] == "r"
        assert _passing(client, "pgha") == []
        r = client.put(f"/v1/agent/service/maintenance/{path}?enable=false")
        assert r.status_code == 200, r.get_data(as_text=True)
        assert _passing(client, "pgha") == ["pgha/pg1"]
    assert_error(client.put("/v1/agent/service/maintenance/pgha/pg2?enable=true"), 404, "not_found")
