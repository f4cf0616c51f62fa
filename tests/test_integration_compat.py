"""A real third-party Consul client (py-consul, unchanged) against a real ``trellis dev``.

Every call goes over HTTP to the subprocess started by the ``trellis_server`` fixture; nothing
is stubbed. Where a test needs to know that a blocking query is really parked on the server,
it reads ``Stats.blocking.waiting`` from ``/v1/agent/self`` (``trellis dev`` runs one worker,
so that number is exact).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul
import pytest

from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def c(trellis_server) -> Iterator[consul.Consul]:
    port = urlsplit(trellis_server.url).port
    client = consul.Consul(host="127.0.0.1", port=port)
    yield client
    # An idle keep-alive connection holds a gevent worker's pool slot, so the server's
    # graceful stop would wait its whole graceful_timeout for it.
    client.http.session.close()


def parked(c: consul.Consul) -> int:
    return int(c.agent.self()["Stats"]["blocking"]["waiting"])


# -- agent, status, catalog nodes -----------------------------------------------------------


def test_agent_self_status_leader_and_nodes(c, trellis_server):
    me = c.agent.self()
    assert me["Config"]["NodeName"] == "test-node"
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Member"]["Name"] == "test-node"

    leader = c.status.leader()
    assert isinstance(leader, str)
    host, _, port = leader.rpartition(":")
    assert host and port.isdigit()
    assert c.status.peers() == [leader]

    index, nodes = c.catalog.nodes()
    assert int(index) >= 1
    names = [n["Node"] for n in nodes]
    assert names == ["test-node"]
    assert nodes[0]["Address"] == "127.0.0.1"
    assert nodes[0]["Datacenter"] == "dc1"


# -- services, TTL checks, health ---------------------------------------------------------


def test_service_with_ttl_check_register_pass_read_deregister(c):
    assert c.agent.service.register(
        "web",
        service_id="web-1",
        address="127.0.0.1",
        port=8080,
        tags=["v1", "primary"],
        meta={"team": "edge"},
        check=consul.Check.ttl("30s"),
    )

    # The agent view: the service and its check, with Consul's check ID for a service's
    # only check.
    assert c.agent.services()["web-1"]["Service"] == "web"
    checks = c.agent.checks()
    assert "service:web-1" in checks, checks
    check = checks["service:web-1"]
    assert check["ServiceID"] == "web-1"
    assert check["Status"] == "critical"  # a TTL check starts critical until it is passed

    # The catalog sees it at once, whatever the health.
    index, services = c.catalog.services()
    assert int(index) >= 1
    assert set(services["web"]) == {"v1", "primary"}
    assert services["consul"] == []  # the server itself, as Consul's (issue 15)
    index, instances = c.catalog.service("web")
    assert len(instances) == 1
    inst = instances[0]
    assert inst["ServiceID"] == "web-1"
    assert inst["ServiceName"] == "web"
    assert inst["ServicePort"] == 8080
    assert inst["ServiceAddress"] == "127.0.0.1"
    assert sorted(inst["ServiceTags"]) == ["primary", "v1"]
    assert inst["ServiceMeta"] == {"team": "edge"}
    assert inst["Node"] == "test-node"

    # Health: listed, but not passing, until the TTL is passed.
    _, all_instances = c.health.service("web")
    assert [e["Service"]["ID"] for e in all_instances] == ["web-1"]
    statuses = {ch["CheckID"]: ch["Status"] for ch in all_instances[0]["Checks"]}
    assert statuses["service:web-1"] == "critical"
    assert statuses.get("serfHealth") == "passing"
    _, healthy = c.health.service("web", passing=True)
    assert healthy == []

    assert c.agent.check.ttl_pass("service:web-1", notes="all good")
    _, healthy = c.health.service("web", passing=True)
    assert [e["Service"]["ID"] for e in healthy] == ["web-1"]
    check = next(ch for ch in healthy[0]["Checks"] if ch["CheckID"] == "service:web-1")
    assert check["Status"] == "passing"
    assert check["Output"] == "all good"

    # Deregistration removes the service and its check everywhere.
    assert c.agent.service.deregister("web-1")
    assert "web-1" not in c.agent.services()
    assert "service:web-1" not in c.agent.checks()
    _, services = c.catalog.services()
    assert "web" not in services
    _, instances = c.catalog.service("web")
    assert instances == []
    _, instances = c.health.service("web")
    assert instances == []


def test_ttl_pass_of_unknown_check_is_refused(c):
    # Consul answers 404, which py-consul's boolean callback turns into False.
    assert c.agent.check.ttl_pass("service:nope") is False


def test_two_instances_only_the_passing_one_is_healthy(c):
    for sid, port in (("api-1", 9001), ("api-2", 9002)):
        assert c.agent.service.register(
            "api", service_id=sid, port=port, check=consul.Check.ttl("30s")
        )
    assert c.agent.check.ttl_pass("service:api-2")
    _, everyone = c.health.service("api")
    assert sorted(e["Service"]["ID"] for e in everyone) == ["api-1", "api-2"]
    _, healthy = c.health.service("api", passing=True)
    assert [e["Service"]["ID"] for e in healthy] == ["api-2"]
    assert healthy[0]["Service"]["Port"] == 9002


# -- K/V ------------------------------------------------------------------------------------


def test_kv_put_get_recurse_delete(c):
    assert c.kv.put("app/config/db", "postgres://db:5432")
    assert c.kv.put("app/config/cache", b"\x00\x01binary\xff")
    assert c.kv.put("app/other", "x")
    assert c.kv.put("unrelated", "y")

    index, item = c.kv.get("app/config/db")
    assert int(index) >= 1
    assert item["Key"] == "app/config/db"
    assert item["Value"] == b"postgres://db:5432"  # py-consul decodes the base64
    assert item["ModifyIndex"] == int(index)

    _, item = c.kv.get("app/config/cache")
    assert item["Value"] == b"\x00\x01binary\xff"

    index, items = c.kv.get("app/", recurse=True)
    assert [i["Key"] for i in items] == ["app/config/cache", "app/config/db", "app/other"]
    assert int(index) == max(i["ModifyIndex"] for i in items)  # py-consul keeps it a str

    _, keys = c.kv.get("app/", keys=True, separator="/")
    assert keys == ["app/config/", "app/other"]

    assert c.kv.delete("app/config/db")
    _, item = c.kv.get("app/config/db")
    assert item is None
    assert c.kv.delete("app/", recurse=True)
    _, items = c.kv.get("app/", recurse=True)
    assert items is None
    _, item = c.kv.get("unrelated")
    assert item["Value"] == b"y"


def test_kv_cas_and_flags(c):
    # cas=0: create only if absent.
    assert c.kv.put("lock/leader", "node-a", cas=0)
    assert not c.kv.put("lock/leader", "node-b", cas=0)
    _, item = c.kv.get("lock/leader")
    assert item["Value"] == b"node-a"

    # cas=ModifyIndex: only the writer that read the current version wins.
    modify = item["ModifyIndex"]
    assert c.kv.put("lock/leader", "node-c", cas=modify)
    assert not c.kv.put("lock/leader", "node-d", cas=modify)  # stale index now
    _, item = c.kv.get("lock/leader")
    assert item["Value"] == b"node-c"
    assert item["ModifyIndex"] > modify

    # Delete with a stale cas does nothing; with the current one it deletes.
    assert not c.kv.delete("lock/leader", cas=modify)
    assert c.kv.get("lock/leader")[1] is not None
    assert c.kv.delete("lock/leader", cas=item["ModifyIndex"])
    assert c.kv.get("lock/leader")[1] is None

    # Flags round-trip, including the largest uint64.
    assert c.kv.put("flagged", "v", flags=42)
    assert c.kv.get("flagged")[1]["Flags"] == 42
    assert c.kv.put("flagged", "v", flags=2**64 - 1)
    assert c.kv.get("flagged")[1]["Flags"] == 2**64 - 1


def test_kv_blocking_get_is_woken_by_a_write(c):
    assert c.kv.put("feature/flag", "off")
    index, item = c.kv.get("feature/flag")
    assert item["Value"] == b"off"

    result: dict = {}

    def block() -> None:
        result["start"] = time.monotonic()
        result["reply"] = c.kv.get("feature/flag", index=index, wait="5s")
        result["end"] = time.monotonic()

    t = threading.Thread(target=block, daemon=True)
    t.start()
    # The query is parked on the server (not merely sent) before we write.
    wait_until(lambda: parked(c) >= 1, timeout=5)
    assert t.is_alive()

    written = time.monotonic()
    assert c.kv.put("feature/flag", "on")
    t.join(6)
    assert not t.is_alive(), "the blocking query did not return"
    new_index, new_item = result["reply"]
    assert new_item["Value"] == b"on"
    assert int(new_index) > int(index)
    latency = result["end"] - written
    print(f"py-consul blocking K/V read woken {latency * 1000:.1f} ms after the write")
    assert latency < 1.0


def test_kv_blocking_get_times_out_with_the_same_index(c):
    assert c.kv.put("quiet", "1")
    index, _ = c.kv.get("quiet")
    start = time.monotonic()
    new_index, item = c.kv.get("quiet", index=index, wait="1s")
    elapsed = time.monotonic() - start
    assert new_index == index
    assert item["Value"] == b"1"
    # wait plus at most wait/16 of jitter, plus generous slack for a busy machine.
    assert 0.9 <= elapsed < 3.0


def test_health_blocking_query_is_woken_by_a_check_passing(c):
    assert c.agent.service.register("db", service_id="db-1", check=consul.Check.ttl("30s"))
    index, healthy = c.health.service("db", passing=True)
    assert healthy == []

    result: dict = {}

    def block() -> None:
        result["reply"] = c.health.service("db", passing=True, index=index, wait="5s")

    t = threading.Thread(target=block, daemon=True)
    t.start()
    wait_until(lambda: parked(c) >= 1, timeout=5)
    assert c.agent.check.ttl_pass("service:db-1")
    t.join(6)
    assert not t.is_alive(), "the blocking health query did not return"
    new_index, healthy = result["reply"]
    assert int(new_index) > int(index)
    assert [e["Service"]["ID"] for e in healthy] == ["db-1"]


# -- ?filter= ---------------------------------------------------------------------------------


def test_filter_expressions_through_py_consul(c):
    """py-consul's ``filter_expr`` (its ``?filter=``) is evaluated, and a bad one raises."""
    for i, env in enumerate(("prod", "qa"), start=1):
        assert c.agent.service.register(
            "api",
            service_id=f"api-{i}",
            port=9000 + i,
            tags=[f"v{i}"],
            meta={"env": env},
            check=consul.Check.ttl("30s"),
        )
    assert c.agent.check.ttl_pass("service:api-1", "up")
    assert set(c.agent.services(filter_expr='Meta.env == "qa"')) == {"api-2"}
    checks = c.agent.checks(filter_expr='Status == "passing" and ServiceName == "api"')
    assert set(checks) == {"service:api-1"}
    _, services = c.catalog.services(filter_expr='"v1" in ServiceTags')
    assert services == {"api": ["v1"]}
    _, nodes = c.catalog.nodes(filter_expr='Node == "test-node"')
    assert [n["Node"] for n in nodes] == ["test-node"]
    _, entries = c.health.service("api", filter_expr='Checks.Status == "critical"')
    assert [e["Service"]["ID"] for e in entries] == ["api-2"]
    with pytest.raises(consul.ConsulException, match=r"unknown selector 'Nope'.*position 1"):
        c.agent.services(filter_expr="Nope == 1")
