"""Consul's request rules that real clients rely on, against a real ``trellis server`` (ACLs
on, default deny) and a real ``trellis agent`` in front of it:

- the token sent as ``?token=`` (what python-consul and py-consul send when given one),
  lowest in priority after ``X-Consul-Token`` and ``Authorization: Bearer``, on the server and
  through the node agent, which forwards the query string as it came;
- service and check IDs holding ``/`` (Patroni registers ``scope/name``), registered,
  read, updated and deregistered through the paths that name them, on both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support import TrellisProcess, server_args, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Cluster:
    server: TrellisProcess
    agent: TrellisProcess
    root: str  # the bootstrap (management) token's secret


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("consul-requests")
    cfg = base / "server.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    started: list[TrellisProcess] = []
    try:
        s = TrellisProcess([*server_args(base / "s", workers=1, node="srv"), "-config", str(cfg)])
        started.append(s)
        s.start()
        r = httpx.put(f"{s.url}/v1/acl/bootstrap")
        assert r.status_code == 200, r.text
        root = r.json()["SecretID"]
        (base / "conf").mkdir()
        a = TrellisProcess(
            [
                *("agent", "-node", "node-a", "-http-port", "0", "-server", s.url),
                *("-data-dir", str(base / "agent"), "-config-dir", str(base / "conf")),
                *("-token", root),
            ]
        )
        started.append(a)
        a.start()
        yield Cluster(s, a, root)
    finally:
        for p in reversed(started):
            p.stop()


def where(cluster: Cluster, via: str) -> str:
    return cluster.server.url if via == "server" else cluster.agent.url


# -- the token as ?token= ----------------------------------------------------------------------


@pytest.mark.parametrize("via", ["server", "agent"])
def test_a_token_sent_only_as_the_query_parameter_is_not_anonymous(cluster, via):
    url = where(cluster, via)
    key = f"{url}/v1/kv/qt/{via}"
    # Anonymous under default deny: refused.
    assert httpx.put(key, content=b"v").status_code == 403
    # The same write with the management token as ?token= (before: 403, as anonymous).
    r = httpx.put(key, content=b"v", params={"token": cluster.root})
    assert r.status_code == 200, r.text
    assert r.json() is True
    r = httpx.get(key, params={"token": cluster.root, "raw": ""})
    assert (r.status_code, r.content) == (200, b"v")
    # A blocking read carries it too (the agent shares those by token).
    index = r.headers["X-Consul-Index"]
    r = httpx.get(key, params={"token": cluster.root, "index": index, "wait": "50ms"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("via", ["server", "agent"])
def test_the_header_and_the_bearer_token_come_before_the_query_parameter(cluster, via):
    url = where(cluster, via)
    key = f"{url}/v1/kv/order/{via}"
    assert httpx.put(key, content=b"v", params={"token": cluster.root}).status_code == 200
    unknown = "00000000-0000-4000-8000-00000000dead"
    # A header naming an unknown token wins over a good ?token=: Consul's 403 for it.
    r = httpx.get(key, params={"token": cluster.root}, headers={"X-Consul-Token": unknown})
    assert r.status_code == 403, r.text
    r = httpx.get(
        key, params={"token": cluster.root}, headers={"Authorization": f"Bearer {unknown}"}
    )
    assert r.status_code == 403, r.text
    # The other way round: the header's good token decides, whatever ?token= says.
    r = httpx.get(key, params={"token": unknown}, headers={"X-Consul-Token": cluster.root})
    assert r.status_code == 200, r.text


def test_the_agents_own_endpoints_take_the_query_token_too(cluster):
    a = cluster.agent.url
    body = {"Name": "qtok", "ID": "qtok-1"}
    assert httpx.put(f"{a}/v1/agent/service/register", json=body).status_code == 403
    r = httpx.put(f"{a}/v1/agent/service/register", json=body, params={"token": cluster.root})
    assert r.status_code == 200, r.text
    r = httpx.put(f"{a}/v1/agent/service/deregister/qtok-1", params={"token": cluster.root})
    assert r.status_code == 200, r.text


# -- IDs with '/' ------------------------------------------------------------------------------


def instances(cluster: Cluster, name: str) -> list[dict]:
    r = httpx.get(
        f"{cluster.server.url}/v1/health/service/{name}",
        headers={"X-Consul-Token": cluster.root},
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("via", ["server", "agent"])
def test_service_and_check_ids_with_slashes(cluster, via):
    url = where(cluster, via)
    auth = {"X-Consul-Token": cluster.root}
    name = f"pg-{via}"
    sid = f"{name}/member-1"  # Patroni's "scope/name"
    body = {"Name": name, "ID": sid, "Port": 5432, "Check": {"TTL": "30s"}}
    r = httpx.put(f"{url}/v1/agent/service/register", json=body, headers=auth)
    assert r.status_code == 200, r.text
    cid = f"service:{sid}"
    # A node check of its own whose ID has slashes too.
    r = httpx.put(
        f"{url}/v1/agent/check/register",
        json={"Name": "disk", "CheckID": f"{name}/disk/root", "TTL": "30s"},
        headers=auth,
    )
    assert r.status_code == 200, r.text

    services = httpx.get(f"{url}/v1/agent/services", headers=auth).json()
    assert services[sid]["Service"] == name
    r = httpx.get(f"{url}/v1/agent/service/{sid}", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["ID"] == sid
    # Percent-encoded, as some clients send it, names the same service.
    r = httpx.get(f"{url}/v1/agent/service/{name}%2Fmember-1", headers=auth)
    assert (r.status_code, r.json()["ID"]) == (200, sid)

    # The catalog and health see it (the agent syncs it to the servers).
    wait_until(lambda: [e["Service"]["ID"] for e in instances(cluster, name)] == [sid])
    r = httpx.get(f"{cluster.server.url}/v1/catalog/service/{name}", headers=auth)
    assert [e["ServiceID"] for e in r.json()] == [sid]

    # TTL updates by paths that hold the slashes.
    for verb, status in (("warn", "warning"), ("fail", "critical"), ("pass", "passing")):
        r = httpx.put(f"{url}/v1/agent/check/{verb}/{cid}", params={"note": verb}, headers=auth)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/v1/agent/checks", headers=auth).json()[cid]["Status"] == status
    r = httpx.put(
        f"{url}/v1/agent/check/update/{cid}",
        json={"Status": "warning", "Output": "slow"},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    checks = httpx.get(f"{url}/v1/agent/checks", headers=auth).json()
    assert (checks[cid]["Status"], checks[cid]["Output"]) == ("warning", "slow")

    def health_status() -> str | None:
        for e in instances(cluster, name):
            for c in e["Checks"]:
                if c["CheckID"] == cid:
                    return c["Status"]
        return None

    wait_until(lambda: health_status() == "warning")

    r = httpx.put(f"{url}/v1/agent/check/deregister/{name}/disk/root", headers=auth)
    assert r.status_code == 200, r.text
    assert f"{name}/disk/root" not in httpx.get(f"{url}/v1/agent/checks", headers=auth).json()
    # Deregistered by the path Patroni uses: /v1/agent/service/deregister/scope/name.
    r = httpx.put(f"{url}/v1/agent/service/deregister/{sid}", headers=auth)
    assert r.status_code == 200, r.text
    assert sid not in httpx.get(f"{url}/v1/agent/services", headers=auth).json()
    wait_until(lambda: instances(cluster, name) == [])
    r = httpx.put(f"{url}/v1/agent/service/deregister/{sid}", headers=auth)
    assert r.status_code == 404, r.text


@pytest.mark.parametrize("via", ["server", "agent"])
@pytest.mark.parametrize(
    "bad_id",
    ["a\nb", "tab\there", "line\u2028sep", "x" * 257],
    ids=["newline", "tab", "U+2028", "too-long"],
)
def test_ids_no_path_could_name_are_refused(cluster, via, bad_id):
    """Consul's HTTP server answers 400 to a path holding an unprintable character, so such
    an ID could never be deregistered: Trellis refuses it at registration."""
    url = where(cluster, via)
    auth = {"X-Consul-Token": cluster.root}
    r = httpx.put(
        f"{url}/v1/agent/service/register", json={"Name": "odd", "ID": bad_id}, headers=auth
    )
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "code", "status"}
    assert "printable" in r.json()["error"]
    r = httpx.put(
        f"{url}/v1/agent/check/register",
        json={"Name": "odd", "CheckID": bad_id, "TTL": "10s"},
        headers=auth,
    )
    assert r.status_code == 400, r.text


# -- sessions through the agent -------------------------------------------------------------------


def test_a_session_created_through_the_agent_is_the_agents_nodes(cluster):
    """Consul's agent fills in its own node; forwarded as it came, the server's was used, so
    a token allowed sessions on the agent's node only was refused, and the session hung on
    the server node's health."""
    root = {"X-Consul-Token": cluster.root}
    r = httpx.put(
        f"{cluster.agent.url}/v1/acl/policy",
        json={"Name": "sessions-on-node-a", "Rules": 'session "node-a" { policy = "write" }'},
        headers=root,
    )
    assert r.status_code == 200, r.text
    r = httpx.put(
        f"{cluster.agent.url}/v1/acl/token",
        json={"Policies": [{"Name": "sessions-on-node-a"}]},
        headers=root,
    )
    assert r.status_code == 200, r.text
    own = r.json()["SecretID"]
    a = cluster.agent.url
    r = httpx.put(f"{a}/v1/session/create", json={"Name": "mine"}, params={"token": own})
    assert r.status_code == 200, r.text
    sid = r.json()["ID"]
    r = httpx.get(f"{a}/v1/session/info/{sid}", headers=root)
    assert (r.json()[0]["Node"], r.json()[0]["NodeChecks"]) == ("node-a", ["serfHealth"])
    # No body at all, as some clients send: the agent's node too.
    r = httpx.put(f"{a}/v1/session/create", headers=root)
    assert r.status_code == 200, r.text
    other = r.json()["ID"]
    assert httpx.get(f"{a}/v1/session/info/{other}", headers=root).json()[0]["Node"] == "node-a"
    # A body that names a node keeps it (any case, as Consul reads field names).
    r = httpx.put(f"{a}/v1/session/create", json={"node": "srv"}, headers=root)
    assert r.status_code == 200, r.text
    third = r.json()["ID"]
    assert httpx.get(f"{a}/v1/session/info/{third}", headers=root).json()[0]["Node"] == "srv"
    for s in (sid, other, third):
        assert httpx.put(f"{a}/v1/session/destroy/{s}", headers=root).status_code == 200
