"""The agent's own endpoints (version, host, metrics, monitor, reload, tokens) and the operator
usage and autopilot endpoints: in-process on both stores, and the streaming monitor and the
reload on a real ``trellis server``."""

from __future__ import annotations

import json
import os
import re
import threading

import httpx
import pytest

from tests.support import TrellisProcess, server_args, wait_until
from trellis.api import telemetry

NODE = "test-node"


def ok(r, status=200):
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:500])
    return r


# -- usage and autopilot ---------------------------------------------------------------------


def test_usage_counts_services_instances_and_connect_kinds(app_client):
    c = app_client
    ok(c.put("/v1/agent/service/register", json={"Name": "web", "ID": "web-1", "Port": 80}))
    ok(c.put("/v1/agent/service/register", json={"Name": "web", "ID": "web-2", "Port": 81}))
    ok(
        c.put(
            "/v1/agent/service/register",
            json={
                "Name": "web-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {"DestinationServiceName": "web"},
            },
        )
    )
    ok(c.put("/v1/agent/service/register", json={"Name": "api", "Connect": {"Native": True}}))
    r = ok(c.get("/v1/operator/usage"))
    body = r.get_json()
    assert body["Usage"] == {
        "dc1": {
            # With the server's own consul service (not billable).
            "Services": 4,
            "ServiceInstances": 5,
            "ConnectServiceInstances": {
                "connect-native": 1,
                "connect-proxy": 1,
                "ingress-gateway": 0,
                "mesh-gateway": 0,
                "terminating-gateway": 0,
            },
            # the proxy is not billed; the Connect-native instance is
            "BillableServiceInstances": 3,
            "Nodes": 1,
        }
    }
    assert body["Index"] == int(r.headers["X-Consul-Index"]) >= 1
    assert ok(c.get("/v1/operator/usage?dc=dc1")).get_json()["Usage"]["dc1"]["Nodes"] == 1
    for path in ("usage", "autopilot/health", "autopilot/state", "autopilot/configuration"):
        r = ok(c.get(f"/v1/operator/{path}?dc=elsewhere"), 400)
        assert r.get_json()["error"] == "No path to datacenter 'elsewhere'"


def test_autopilot_reports_this_server_alone_with_the_store_index(app_client):
    c = app_client
    ok(c.put("/v1/kv/a", data=b"1"))
    index = int(ok(c.get("/v1/kv/a")).headers["X-Consul-Index"])
    health = ok(c.get("/v1/operator/autopilot/health")).get_json()
    assert health["Healthy"] is True and health["FailureTolerance"] == 0
    [server] = health["Servers"]
    assert server["Name"] == NODE and server["Leader"] and server["Voter"]
    assert server["LastIndex"] >= index and server["LastTerm"] == 0
    assert server["Address"] == ok(c.get("/v1/status/leader")).get_json()
    state = ok(c.get("/v1/operator/autopilot/state")).get_json()
    assert state["Leader"] == server["ID"] and state["Voters"] == [server["ID"]]
    assert state["Servers"][server["ID"]]["Status"] == "leader"
    cfg = ok(c.get("/v1/operator/autopilot/configuration")).get_json()
    assert cfg["CleanupDeadServers"] is False and cfg["DisableUpgradeMigration"] is True
    r = ok(c.put("/v1/operator/autopilot/configuration", json={"CleanupDeadServers": True}), 400)
    assert "no autopilot" in r.get_json()["error"]


# -- version, host, metrics ------------------------------------------------------------------


def test_version_and_host(app_client):
    c = app_client
    v = ok(c.get("/v1/agent/version")).get_json()
    assert v["HumanVersion"] == ok(c.get("/v1/agent/self")).get_json()["Config"]["Version"]
    h = ok(c.get("/v1/agent/host")).get_json()
    assert h["Host"]["hostname"] == os.uname().nodename
    assert h["Memory"]["total"] > 0 and h["CPU"] and h["Disk"]["total"] > 0
    assert h["Errors"] is None


def test_host_parsers_take_odd_proc_text_without_failing():
    # Fields present but empty or not numbers (containers and odd kernels write such).
    [cpu] = telemetry._cpus("processor\t: 0\ncache size\t:\nstepping\t: x\ncpu MHz\t: 1.2.3\n")
    assert (cpu["cpu"], cpu["cacheSize"], cpu["stepping"], cpu["mhz"]) == (0, 0, 0, 0.0)
    [cpu] = telemetry._cpus("processor\t: 3\ncache size\t: 512 KB\ncpu MHz\t: 2600.5\n")
    assert (cpu["cpu"], cpu["cacheSize"], cpu["mhz"]) == (3, 512, 2600.5)
    assert telemetry._meminfo("MemTotal: \nMemFree: 5 kB\nBad\n") == {"MemFree": 5120}
    assert telemetry._cpus("") == []


def _counter(body: dict, name: str, **labels: str) -> float:
    return sum(
        x["Count"]
        for x in body["Counters"]
        if x["Name"] == name and all(x["Labels"].get(k) == v for k, v in labels.items())
    )


def test_metrics_count_this_process_requests_and_report_store_figures(app_client):
    c = app_client
    before = ok(c.get("/v1/agent/metrics")).get_json()
    for _ in range(5):
        ok(c.get("/v1/status/leader"))
    ok(c.put("/v1/agent/service/register", json={"Name": "web", "Port": 80}))
    ok(c.put("/v1/session/create", json={}))
    after = ok(c.get("/v1/agent/metrics")).get_json()
    # The 5 reads, the 2 writes and the first metrics read itself.
    got = _counter(after, "consul.http.requests") - _counter(before, "consul.http.requests")
    assert got == 8
    assert _counter(after, "consul.http.requests", method="PUT") == 2
    gauges = {(g["Name"], tuple(sorted(g["Labels"].items()))): g["Value"] for g in after["Gauges"]}
    assert gauges[("consul.catalog.service_instances", ())] == 2  # web, the server's consul
    assert gauges[("consul.session.count", ())] == 1
    assert gauges[("consul.blocking.waiting", ())] == 0
    assert after["Points"] == []
    [http] = [s for s in after["Samples"] if s["Name"] == "consul.api.http"][:1]
    assert http["Count"] >= 1 and http["Min"] <= http["Mean"] <= http["Max"]


def test_a_blocking_query_counts_once(app_client):
    c = app_client
    ok(c.put("/v1/kv/a", data=b"1"))
    index = ok(c.get("/v1/kv/a")).headers["X-Consul-Index"]
    before = ok(c.get("/v1/agent/metrics")).get_json()
    # Parks, is re-run when its wait runs out, and answers: one request.
    ok(c.get(f"/v1/kv/a?index={index}&wait=50ms"))
    after = ok(c.get("/v1/agent/metrics")).get_json()
    got = _counter(after, "consul.http.requests") - _counter(before, "consul.http.requests")
    assert got == 2  # the blocking read and the first metrics read


def test_metrics_in_prometheus_format(app_client):
    c = app_client
    ok(c.get("/v1/status/leader"))
    r = ok(c.get("/v1/agent/metrics?format=prometheus"))
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.get_data(as_text=True)
    assert "# TYPE consul_catalog_nodes gauge\nconsul_catalog_nodes 1\n" in text
    assert re.search(
        r'^consul_http_requests\{code="200",method="GET",worker_pid="\d+"\} \d+$', text, re.M
    )
    assert re.search(r'^consul_api_http_count\{method="GET",worker_pid="\d+"\} \d+$', text, re.M)
    for line in text.splitlines():
        assert line.startswith("# TYPE ") or re.fullmatch(r"[a-z_:]+(\{.*\})? [0-9.e+-]+", line), (
            line
        )
    ok(c.get("/v1/agent/metrics?format=xml"), 400)


# -- tokens -----------------------------------------------------------------------------------


def test_agent_tokens_are_kept_private_under_their_kind(app_client, tmp_path):
    c = app_client
    ok(c.put("/v1/agent/token/default", json={"Token": "t-default"}))
    ok(c.put("/v1/agent/token/acl_agent_token", json={"Token": "t-agent"}))  # Consul's old name
    ok(c.put("/v1/agent/token/dns", json={"Token": "t-dns"}))
    path = tmp_path / "agent-tokens.json"
    assert json.loads(path.read_text()) == {
        "agent": "t-agent",
        "default": "t-default",
        "dns": "t-dns",
    }
    assert path.stat().st_mode & 0o777 == 0o600
    r = ok(c.put("/v1/agent/token/master-of-all", json={"Token": "x"}), 404)
    assert r.get_json()["error"] == 'Token "master-of-all" is unknown'
    ok(c.put("/v1/agent/token/default", json={"Token": 5}), 400)
    ok(c.put("/v1/agent/token/default", json=["t"]), 400)
    # Nothing but the one file, and no temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if "agent-tokens" in p.name) == [
        "agent-tokens.json"
    ]


# -- agent/services as Consul prints it ---------------------------------------------------------


def test_agent_services_omit_empty_kind_and_tagged_addresses(app_client):
    c = app_client
    ok(c.put("/v1/agent/service/register", json={"Name": "web", "Port": 80}))
    ok(
        c.put(
            "/v1/agent/service/register",
            json={
                "Name": "web-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {"DestinationServiceName": "web"},
                "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 21000}},
            },
        )
    )
    listed = ok(c.get("/v1/agent/services")).get_json()
    assert "Kind" not in listed["web"] and "TaggedAddresses" not in listed["web"]
    assert listed["web-proxy"]["Kind"] == "connect-proxy"
    assert listed["web-proxy"]["TaggedAddresses"]["lan"]["Address"] == "10.0.0.1"
    one = ok(c.get("/v1/agent/service/web")).get_json()
    assert "Kind" not in one and one["ContentHash"]
    # A filter still sees the empty Kind.
    flt = ok(c.get("/v1/agent/services", query_string={"filter": 'Kind == ""'})).get_json()
    assert list(flt) == ["web"]
    # The catalog keeps both.
    [svc] = ok(c.get("/v1/catalog/service/web")).get_json()
    assert svc["ServiceKind"] == "" and "ServiceTaggedAddresses" in svc


def test_the_server_refuses_script_checks_as_a_consul_agent_without_them(app_client):
    c = app_client
    for body in (
        {"Name": "s", "Args": ["/bin/true"], "Interval": "10s"},
        {"name": "s", "args": ["/bin/true"], "interval": "10s"},
    ):
        r = ok(c.put("/v1/agent/check/register", json=body), 400)
        assert r.get_json()["error"].startswith("Scripts are disabled on this agent")
    for body in (
        {"Name": "w", "Check": {"Args": ["/bin/true"], "Interval": "10s"}},
        {"Name": "w", "Checks": [{"ScriptArgs": ["/bin/true"], "Interval": "10s"}]},
    ):
        r = ok(c.put("/v1/agent/service/register", json=body), 400)
        assert r.get_json()["error"].startswith("Scripts are disabled on this agent")
    assert ok(c.get("/v1/agent/services")).get_json() == {}
    ok(c.put("/v1/agent/service/register", json={"Name": "w", "Checks": 5}), 400)


# -- a real server: the monitor streams, reload applies the log level ---------------------------


@pytest.fixture
def server_with_config(tmp_path):
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"log_level": "info"}))
    p = TrellisProcess(
        [*server_args(tmp_path / "data", workers=1, node="srv"), "-config", str(cfg)]
    )
    try:
        yield p.start(), cfg
    finally:
        p.stop()


def test_monitor_streams_log_lines_as_they_happen(server_with_config):
    server, _ = server_with_config
    lines: list[str] = []
    started, done = threading.Event(), threading.Event()

    def follow() -> None:
        with httpx.stream("GET", server.url + "/v1/agent/monitor?loglevel=info", timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                started.set()
                if "reloaded" in line:
                    break
        done.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert started.wait(15), server.output()
    # A log line made after the monitor started reaches it while the stream is open.
    assert httpx.put(server.url + "/v1/agent/reload", timeout=10).status_code == 200
    assert done.wait(15), (lines, server.output())
    assert re.search(r"\[INFO\]  trellis\.agent: reloaded .*server\.json", lines[-1])
    t.join(5)


def test_monitor_json_lines_and_levels(server_with_config):
    server, cfg = server_with_config
    got: list[dict] = []
    with httpx.stream(
        "GET", server.url + "/v1/agent/monitor?loglevel=warn&logjson", timeout=30
    ) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        first = json.loads(next(it))
        assert (first["@level"], first["@message"]) == ("info", "monitor started at level warn")
        # info (the reload) is below warn; the warning that a setting needs a restart is not
        cfg.write_text(json.dumps({"log_level": "info", "datacenter": "dc9"}))
        assert httpx.put(server.url + "/v1/agent/reload", timeout=10).status_code == 200
        for line in it:
            got.append(json.loads(line))
            break
    assert got[0]["@level"] == "warn"
    assert "datacenter" in got[0]["@message"] and "restart" in got[0]["@message"]
    assert set(got[0]) == {"@level", "@message", "@module", "@timestamp"}
    r = httpx.get(server.url + "/v1/agent/monitor?loglevel=loud", timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "Unknown log level: loud"


def test_reload_applies_the_log_level_and_refuses_a_broken_file(server_with_config):
    server, cfg = server_with_config
    with httpx.stream("GET", server.url + "/v1/agent/monitor?loglevel=debug", timeout=30) as r:
        it = r.iter_lines()
        next(it)
        cfg.write_text(json.dumps({"log_level": "debug"}))
        assert httpx.put(server.url + "/v1/agent/reload", timeout=10).status_code == 200
        # The reload's own debug line, logged once the level is debug, reaches the monitor.
        want = re.compile(r"\[DEBUG\]  trellis\.agent: reload: now logging at debug$")
        seen = next((line for line in it if want.search(line)), None)
    assert seen is not None
    cfg.write_text("{not json")
    r = httpx.put(server.url + "/v1/agent/reload", timeout=10)
    assert r.status_code == 400 and "does not parse" in r.json()["error"]
    assert httpx.get(server.url + "/v1/status/leader", timeout=10).status_code == 200


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_monitor_client_that_goes_is_let_go(tmp_path, worker_class):
    server = TrellisProcess(
        [*server_args(tmp_path, workers=1, node="srv"), "-worker-class", worker_class]
    )
    try:
        server.start()
        _monitor_client_goes(server)
    finally:
        server.stop()


def _monitor_client_goes(server: TrellisProcess) -> None:

    def open_monitors() -> float:
        body = httpx.get(server.url + "/v1/agent/metrics", timeout=10).json()
        [g] = [g["Value"] for g in body["Gauges"] if g["Name"] == "consul.agent.monitors"]
        return g

    for _ in range(3):
        with httpx.stream("GET", server.url + "/v1/agent/monitor", timeout=30) as r:
            next(r.iter_lines())
            assert open_monitors() >= 1
        # The stream ends when its client goes (the worker notices within a second, with no
        # log line to write): the one worker's gauge of open monitors falls back to 0.
        wait_until(lambda: open_monitors() == 0, timeout=15)


# -- the node agent answers version and host for its own node ----------------------------------


def test_node_agent_answers_version_and_its_host_under_operator_read(tmp_path):
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    procs: list[TrellisProcess] = []
    try:
        server = TrellisProcess(
            [*server_args(tmp_path / "srv", workers=1, node="srv"), "-config", str(cfg)]
        ).start()
        procs.append(server)
        root = httpx.put(server.url + "/v1/acl/bootstrap", timeout=10).json()["SecretID"]

        def token(rules: str) -> str:
            h = {"X-Consul-Token": root}
            name = f"p{len(rules)}"
            pol = {"Name": name, "Rules": rules}
            assert httpx.put(server.url + "/v1/acl/policy", json=pol, headers=h).status_code == 200
            body = {"Policies": [{"Name": name}]}
            return httpx.put(server.url + "/v1/acl/token", json=body, headers=h).json()["SecretID"]

        op, nodes = token('operator = "read"'), token('node_prefix "" { policy = "write" }')
        base = tmp_path / "node-a"
        (base / "conf").mkdir(parents=True)
        agent = TrellisProcess(
            [
                *("agent", "-node", "node-a", "-http-port", "0", "-server", server.url),
                *("-data-dir", str(base / "data"), "-config-dir", str(base / "conf")),
                *("-token", root),
            ]
        )
        procs.append(agent)
        agent.start()
        v = httpx.get(agent.url + "/v1/agent/version", timeout=10)
        assert v.status_code == 200 and v.json()["HumanVersion"]
        h = httpx.get(agent.url + "/v1/agent/host", headers={"X-Consul-Token": op}, timeout=10)
        assert h.status_code == 200 and h.json()["Host"]["hostname"] == os.uname().nodename
        for t in (nodes, "", "00000000-0000-4000-8000-0000000000ff"):
            r = httpx.get(agent.url + "/v1/agent/host", headers={"X-Consul-Token": t}, timeout=10)
            assert r.status_code == 403, (t, r.text)
        # The service definition's Locality is kept in the agent's view of it.
        h = {"X-Consul-Token": root}
        loc = {"Region": "eu-west-1", "Zone": "eu-west-1a"}
        body = {"Name": "web", "Port": 80, "Locality": loc}
        r = httpx.put(agent.url + "/v1/agent/service/register", json=body, headers=h, timeout=10)
        assert r.status_code == 200, r.text
        listed = httpx.get(agent.url + "/v1/agent/services", headers=h, timeout=10).json()
        assert listed["web"]["Locality"] == loc
        assert "Kind" not in listed["web"] and "TaggedAddresses" not in listed["web"]
        # agent/self has the DebugConfig subset, and agent/members this node's Member.
        me = httpx.get(agent.url + "/v1/agent/self", headers=h, timeout=10).json()
        assert me["DebugConfig"]["NodeName"] == "node-a"
        assert me["DebugConfig"]["ServerMode"] is False
        assert me["DebugConfig"]["EnableScriptChecks"] is False
        assert "xDS" not in me
        members = httpx.get(agent.url + "/v1/agent/members", headers=h, timeout=10).json()
        assert [m for m in members if m["Name"] == "node-a"] == [me["Member"]]
    finally:
        for p in reversed(procs):
            p.stop()
