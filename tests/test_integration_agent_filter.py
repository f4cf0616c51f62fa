"""``?filter=`` on the node agent's local API: real ``trellis server`` and ``trellis agent``
processes, each recorded and ended by PID (also when the test fails).

The agent evaluates the filter on the endpoints it answers itself (``agent/services``,
``agent/checks``, ``agent/members``) with the servers' language and errors; its other local
endpoints refuse one; forwarded requests are filtered by the server.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import TrellisProcess, server_args, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def started() -> Iterator[list[TrellisProcess]]:
    procs: list[TrellisProcess] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def test_the_agents_local_api_filters(tmp_path, started):
    server = TrellisProcess(server_args(tmp_path / "server", workers=1, node="srv")).start()
    started.append(server)
    base = tmp_path / "node-a"
    (base / "conf").mkdir(parents=True)
    agent = TrellisProcess(
        [
            "agent",
            "-node",
            "node-a",
            "-http-port",
            "0",
            "-server",
            server.url,
            "-data-dir",
            str(base / "data"),
            "-config-dir",
            str(base / "conf"),
        ]
    )
    started.append(agent)
    agent.start()
    url = agent.url
    with httpx.Client(base_url=url, timeout=10) as http:
        for i, env in enumerate(("production", "production", "qa"), start=1):
            r = http.put(
                "/v1/agent/service/register",
                json={
                    "ID": f"redis{i}",
                    "Name": "redis",
                    "Port": 1233 + i,
                    "Tags": ["primary" if i != 2 else "secondary"],
                    "Meta": {"env": env},
                    "Check": {"CheckID": f"redis{i}-ttl", "TTL": "30s"},
                },
            )
            assert r.status_code == 200, r.text

        def get(path: str, expression: str) -> httpx.Response:
            return http.get(path, params={"filter": expression})

        r = get("/v1/agent/services", 'Meta.env == "qa"')
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"redis3"}
        r = get("/v1/agent/services", '"primary" in Tags and not Port == 1234')
        assert set(r.json()) == {"redis3"}
        assert http.put("/v1/agent/check/pass/redis2-ttl").status_code == 200
        r = get("/v1/agent/checks", 'Status == "passing"')
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"redis2-ttl"}
        # The agent's node reaches the catalog, and members lists it.
        wait_until(lambda: get("/v1/agent/members", 'Name == "node-a"').json())
        r = get("/v1/agent/members", 'Name matches "^node-" and Status == 1')
        assert [m["Name"] for m in r.json()] == ["node-a"]

        # An invalid expression: the same 400 as on the servers, with the position.
        r = get("/v1/agent/services", "Meta.env = qa")
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["code"] == "bad_request"
        assert body["error"].startswith("query parameter 'filter': expected an operator")
        assert body["error"].endswith("(at position 10)")
        r = get("/v1/agent/checks", "ServiceTags == x")
        assert r.status_code == 400 and "does not apply to ServiceTags" in r.json()["error"]

        # A local endpoint that does not filter refuses one rather than ignore it.
        r = get("/v1/agent/service/redis1", 'Service == "redis"')
        assert r.status_code == 400 and "'filter' is not supported" in r.json()["error"]
        r = get("/v1/agent/self", 'Service == "redis"')
        assert r.status_code == 400 and "'filter' is not supported" in r.json()["error"]

        # Forwarded reads are filtered by the server.
        wait_until(lambda: len(http.get("/v1/catalog/service/redis").json()) == 3)
        r = get("/v1/catalog/service/redis", 'ServiceMeta.env == "qa"')
        assert r.status_code == 200, r.text
        assert [s["ServiceID"] for s in r.json()] == ["redis3"]
        # Through a list of objects: no check critical (the node's serfHealth passes, and so
        # does redis2's TTL check once the agent has synced it).
        wait_until(
            lambda: (
                [
                    e["Service"]["ID"]
                    for e in get("/v1/health/service/redis", 'Checks.Status != "critical"').json()
                ]
                == ["redis2"]
            )
        )
        r = get("/v1/health/service/redis", 'Checks.Status == "critical"')
        assert [e["Service"]["ID"] for e in r.json()] == ["redis1", "redis3"]
