"""``trellis agent`` end to end: real ``trellis server`` and ``trellis agent`` processes on free
ports, each recorded and ended by PID (also when a test fails)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import consul
import httpx
import pytest

from tests.http_stub import Reply, Seen, StubServer
from tests.support import TRELLIS, TrellisProcess, server_args, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def started() -> Iterator[list[TrellisProcess]]:
    procs: list[TrellisProcess] = []
    yield procs
    for p in reversed(procs):
        p.stop()


@pytest.fixture
def server(tmp_path, started) -> TrellisProcess:
    p = TrellisProcess(server_args(tmp_path / "server", workers=1, node="srv")).start()
    started.append(p)
    return p


Start = Callable[..., TrellisProcess]


@pytest.fixture
def agent(tmp_path, started) -> Start:
    """Start ``trellis agent`` for node ``node`` against ``servers``; its data dir and config
    dir are under tmp_path/<node>."""

    def start(node: str, *servers: str, extra: tuple[str, ...] = ()) -> TrellisProcess:
        base = tmp_path / node
        (base / "conf").mkdir(parents=True, exist_ok=True)
        args = ["agent", "-node", node, "-http-port", "0"]
        for s in servers:
            args += ["-server", s]
        args += ["-data-dir", str(base / "data"), "-config-dir", str(base / "conf"), *extra]
        p = TrellisProcess(args)
        started.append(p)
        return p.start()

    return start


def conf(tmp_path: Path, node: str) -> Path:
    d = tmp_path / node / "conf"
    d.mkdir(parents=True, exist_ok=True)
    return d


def node_services(url: str, node: str) -> dict:
    r = httpx.get(f"{url}/v1/catalog/node/{node}", timeout=5)
    if r.status_code == 404 or r.json() is None:
        return {}
    return r.json()["Services"] or {}


def wait_services(url: str, node: str, want: set[str], timeout: float = 15.0) -> dict:
    found = wait_until(
        lambda: (s,) if set(s := node_services(url, node)) == want else None, timeout=timeout
    )
    return found[0]


def test_two_agents_register_their_nodes_services_from_config_dirs(tmp_path, server, agent):
    (conf(tmp_path, "node-a") / "web.json").write_text(
        json.dumps({"service": {"name": "web", "port": 8080, "check": {"ttl": "30s"}}})
    )
    (conf(tmp_path, "node-b") / "db.hcl").write_text(
        'service {\n  name = "db"\n  port = 5432\n  tags = ["primary"]\n}\n'
    )
    a = agent("node-a", server.url)
    b = agent("node-b", server.url)
    assert a.url != b.url
    assert "Service: web (ID web)" in a.output()
    wait_services(server.url, "node-a", {"web"})
    db = wait_services(server.url, "node-b", {"db"})["db"]
    assert (db["Port"], db["Tags"]) == (5432, ["primary"])
    # Each agent answers for its own node.
    assert set(httpx.get(f"{a.url}/v1/agent/services").json()) == {"web"}
    assert set(httpx.get(f"{b.url}/v1/agent/services").json()) == {"db"}
    # A TTL update on the agent reaches the catalog (only the change is written).
    r = httpx.put(f"{a.url}/v1/agent/check/pass/service:web", params={"note": "fine"})
    assert r.status_code == 200, r.text
    wait_until(
        lambda: [
            c
            for c in httpx.get(f"{server.url}/v1/health/checks/web").json()
            if (c["Status"], c["Output"]) == ("passing", "fine")
        ]
    )
    # Both nodes are alive in `trellis members`.
    out = subprocess.run(
        [TRELLIS, "members", "-http-addr", a.url], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()[1:]}
    assert rows["node-a"] == rows["node-b"] == "alive"
    # SIGTERM: a graceful leave deregisters what the agent registered.
    a.stop()
    wait_services(server.url, "node-a", set())
    assert set(node_services(server.url, "node-b")) == {"db"}


def test_py_consul_against_an_agent_registers_and_reads_the_catalog(server, agent):
    a = agent("node-a", server.url)
    c = consul.Consul(host="127.0.0.1", port=urlsplit(a.url).port)
    try:
        assert c.agent.service.register(
            "api", service_id="api-1", port=9000, tags=["v2"], check=consul.Check.ttl("30s")
        )
        assert "api-1" in c.agent.services()
        # The registration was written through to the catalog under the agent's node.
        _, nodes = c.catalog.service("api")
        assert [(n["Node"], n["ServiceID"], n["ServiceTags"]) for n in nodes] == [
            ("node-a", "api-1", ["v2"])
        ]
        assert c.agent.check.ttl_pass("service:api-1", "up")
        wait_until(lambda: c.health.service("api", passing=True)[1])
        c.kv.put("cfg/x", "1")
        _, item = c.kv.get("cfg/x")
        assert item["Value"] == b"1"
        assert c.agent.service.deregister("api-1")
        assert c.catalog.service("api")[1] == []
    finally:
        c.http.session.close()


def test_trellis_services_register_and_deregister_against_the_agent(tmp_path, server, agent):
    a = agent("node-a", server.url)
    f = tmp_path / "cache.hcl"
    f.write_text('service {\n  name = "cache"\n  port = 6379\n}\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TRELLIS, "services", *args, "-http-addr", a.url],
            capture_output=True,
            text=True,
            timeout=30,
        )

    r = cli("register", str(f))
    assert (r.returncode, r.stdout) == (0, "Registered service: cache\n"), r.stderr
    r = cli("register", "-name", "queue", "-port", "5672", "-tag", "amqp")
    assert r.returncode == 0, r.stderr
    got = wait_services(server.url, "node-a", {"cache", "queue"})
    assert got["queue"]["Tags"] == ["amqp"]
    r = cli("deregister", str(f))
    assert (r.returncode, r.stdout) == (0, "Deregistered service: cache\n"), r.stderr
    r = cli("deregister", "-id", "queue")
    assert r.returncode == 0, r.stderr
    assert node_services(server.url, "node-a") == {}
    r = cli("deregister", "-id", "queue")
    assert r.returncode == 1 and "Unknown service ID" in r.stderr


def test_a_blocking_kv_read_through_the_agent_blocks_and_wakes(server, agent):
    a = agent("node-a", server.url)
    r = httpx.put(f"{a.url}/v1/kv/k", content=b"one")
    assert r.status_code == 200
    r = httpx.get(f"{a.url}/v1/kv/k")
    index = int(r.headers["X-Consul-Index"])
    got: dict = {}

    def read() -> None:
        t0 = time.monotonic()
        resp = httpx.get(f"{a.url}/v1/kv/k", params={"index": index, "wait": "30s"}, timeout=40)
        got.update(resp=resp, took=time.monotonic() - t0)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(1.0)
    assert t.is_alive(), "the read did not block"
    assert httpx.put(f"{server.url}/v1/kv/k", content=b"two").status_code == 200
    t.join(10)
    assert not t.is_alive()
    resp = got["resp"]
    assert resp.status_code == 200
    assert int(resp.headers["X-Consul-Index"]) > index
    assert resp.json()[0]["Value"] == "dHdv"  # base64 of "two"
    assert got["took"] < 10


def _parked(server_url: str) -> int:
    r = httpx.get(f"{server_url}/v1/agent/self")
    return int(r.json()["Stats"]["blocking"]["waiting"])


def test_a_client_that_hangs_up_ends_its_forwarded_blocking_query(server, agent):
    a = agent("node-a", server.url)
    # A blocking read the agent forwards as it comes (not one of the shared reads).
    path = "/v1/connect/ca/configuration"
    index = int(httpx.get(f"{a.url}{path}").headers["X-Consul-Index"])

    # The agent's own watch of its node is one blocking query on the server.
    wait_until(lambda: _parked(server.url) == 1)
    port = urlsplit(a.url).port
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path}?index={index}&wait=60s HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: _parked(server.url) == 2)
    # The client hung up: the agent closed its request to the server, which stopped waiting.
    wait_until(lambda: _parked(server.url) == 1, timeout=10)


def test_identical_blocking_reads_of_local_clients_hold_one_query_on_the_server(server, agent):
    """Issue 11 item 4: three clients of the node blocking on the same read (same path, query
    and token) are one blocking query on the server, counted by the server; one write answers
    all three with the new index."""
    a = agent("node-a", server.url)
    httpx.put(f"{a.url}/v1/kv/k", content=b"x")
    index = int(httpx.get(f"{a.url}/v1/kv/k").headers["X-Consul-Index"])
    wait_until(lambda: _parked(server.url) == 1)  # the agent's watch of its node
    port = urlsplit(a.url).port
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(
                f"GET /v1/kv/k?index={index}&wait=60s HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )

        def shared() -> int:
            stats = httpx.get(f"{a.url}/v1/agent/self").json()["Stats"]["agent"]
            return int(stats["shared_watches"])

        wait_until(lambda: shared() == 1 and _parked(server.url) == 2)
        assert _parked(server.url) == 2  # not 4: one for the three clients
        assert httpx.put(f"{server.url}/v1/kv/k", content=b"y").status_code == 200
        for sock in socks:
            sock.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                assert chunk, "the agent closed the connection"
                head += chunk
            got = int(head.split(b"x-consul-index: ", 1)[1].split(b"\r\n", 1)[0])
            assert head.startswith(b"HTTP/1.1 200") and got > index
    finally:
        for sock in socks:
            sock.close()


def test_a_server_restarted_empty_gets_the_nodes_services_back(tmp_path, started, agent):
    first = TrellisProcess(server_args(tmp_path / "s1", workers=1, node="srv")).start()
    started.append(first)
    (conf(tmp_path, "node-a") / "web.json").write_text(
        json.dumps({"service": {"name": "web", "port": 80}})
    )
    a = agent("node-a", first.url)
    r = httpx.put(f"{a.url}/v1/agent/service/register", json={"Name": "api", "Port": 81})
    assert r.status_code == 200, r.text
    wait_services(first.url, "node-a", {"web", "api"})
    port = urlsplit(first.url).port
    first.stop()
    # The same address, a new and empty store.
    args = server_args(tmp_path / "s2", workers=1, node="srv")
    args[args.index("-http-port") + 1] = str(port)
    second = TrellisProcess(args).start()
    started.append(second)
    try:
        wait_services(second.url, "node-a", {"web", "api"}, timeout=30)
    except AssertionError as e:
        raise AssertionError(f"{e}\nagent:\n{a.output()}\nserver:\n{second.output()}") from None


def test_failover_to_the_next_server(tmp_path, started, agent):
    s1 = TrellisProcess(server_args(tmp_path / "s1", workers=1, node="srv1")).start()
    s2 = TrellisProcess(server_args(tmp_path / "s2", workers=1, node="srv2")).start()
    started += [s1, s2]
    (conf(tmp_path, "node-a") / "web.json").write_text(json.dumps({"service": {"name": "web"}}))
    a = agent("node-a", s1.url, s2.url)
    wait_services(s1.url, "node-a", {"web"})
    s1.stop()
    # The agent moves to the second server and syncs its node there (its store is separate).
    wait_services(s2.url, "node-a", {"web"}, timeout=30)
    assert httpx.get(f"{a.url}/v1/status/leader").status_code == 200


def test_sighup_and_trellis_reload_apply_added_changed_and_removed_files(tmp_path, server, agent):
    d = conf(tmp_path, "node-a")
    (d / "a.json").write_text(json.dumps({"service": {"name": "a", "port": 1}}))
    (d / "b.json").write_text(json.dumps({"service": {"name": "b", "port": 2}}))
    p = agent("node-a", server.url)
    wait_services(server.url, "node-a", {"a", "b"})
    # SIGHUP: one added, one changed, one removed.
    (d / "c.json").write_text(json.dumps({"service": {"name": "c", "port": 3}}))
    (d / "a.json").write_text(json.dumps({"service": {"name": "a", "port": 11}}))
    (d / "b.json").unlink()
    p.proc.send_signal(signal.SIGHUP)
    got = wait_services(server.url, "node-a", {"a", "c"})
    wait_until(lambda: node_services(server.url, "node-a")["a"]["Port"] == 11)
    assert got["c"]["Port"] == 3
    # trellis reload: a bad file is refused with its path and reason; the rest apply, and
    # the services of the refused file keep running as they were.
    (d / "c.json").write_text("{oops")
    (d / "d.json").write_text(json.dumps({"service": {"name": "d"}}))
    r = subprocess.run(
        [TRELLIS, "reload", "-http-addr", p.url], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1
    assert f"{d / 'c.json'}: cannot decode" in r.stderr
    wait_services(server.url, "node-a", {"a", "c", "d"})
    assert "refused config file" in p.output()
    # Fixed, removed, reloaded.
    (d / "c.json").unlink()
    r = subprocess.run(
        [TRELLIS, "reload", "-http-addr", p.url], capture_output=True, text=True, timeout=30
    )
    assert (r.returncode, r.stdout.strip()) == (0, "Configuration reload triggered"), r.stderr
    wait_services(server.url, "node-a", {"a", "d"})


def test_the_agent_restarted_keeps_its_api_registrations(tmp_path, server, agent):
    p = agent("node-a", server.url)
    r = httpx.put(
        f"{p.url}/v1/agent/service/register",
        json={"name": "api", "port": 81, "check": {"ttl": "30s"}},
    )
    assert r.status_code == 200, r.text
    wait_services(server.url, "node-a", {"api"})
    p.stop()  # a graceful leave takes it out of the catalog...
    wait_services(server.url, "node-a", set())
    again = agent("node-a", server.url)  # ...and the same data dir brings it back
    assert set(httpx.get(f"{again.url}/v1/agent/services").json()) == {"api"}
    wait_services(server.url, "node-a", {"api"})
    checks = httpx.get(f"{again.url}/v1/agent/checks").json()
    assert list(checks) == ["service:api"]


def test_a_killed_agent_shows_as_failed_after_its_node_ttl(server, agent):
    p = agent("node-a", server.url, extra=("-node-ttl", "3s"))

    def status() -> str | None:
        r = subprocess.run(
            [TRELLIS, "members", "-http-addr", server.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        rows = {ln.split()[0]: ln.split()[2] for ln in r.stdout.splitlines()[1:]}
        return rows.get("node-a")

    wait_until(lambda: status() == "alive")
    # Alive, read after read, for longer than the TTL while the agent runs: its heartbeat
    # keeps it so.
    until = time.monotonic() + 4
    while time.monotonic() < until:
        assert status() == "alive"
    p.kill()
    wait_until(lambda: status() == "failed", timeout=15)


def test_a_403_from_the_server_is_the_callers_403(tmp_path, started, agent):
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    s = TrellisProcess(
        [*server_args(tmp_path / "s", workers=1, node="srv"), "-config", str(cfg)]
    ).start()
    started.append(s)
    r = httpx.put(f"{s.url}/v1/acl/bootstrap")
    assert r.status_code == 200, r.text
    root = r.json()["SecretID"]
    a = agent("node-a", s.url, extra=("-token", root))
    # No token of the caller's: the anonymous token, refused by the server, is refused here.
    r = httpx.put(f"{a.url}/v1/agent/service/register", json={"Name": "web"})
    assert r.status_code == 403, r.text
    assert set(r.json()) == {"error", "code", "status"}
    assert httpx.get(f"{a.url}/v1/agent/services").json() == {}
    r = httpx.put(
        f"{a.url}/v1/agent/service/register",
        json={"Name": "web"},
        headers={"X-Consul-Token": root},
    )
    assert r.status_code == 200, r.text
    wait_services_token(s.url, "node-a", {"web"}, root)
    # A check's TTL is set with the caller's token too: none is refused.
    r = httpx.put(
        f"{a.url}/v1/agent/check/register",
        json={"Name": "beat", "TTL": "30s", "ServiceID": "web"},
        headers={"X-Consul-Token": root},
    )
    assert r.status_code == 200, r.text
    assert httpx.put(f"{a.url}/v1/agent/check/pass/beat").status_code == 403
    assert httpx.get(f"{a.url}/v1/agent/checks").json()["beat"]["Status"] == "critical"
    r = httpx.put(f"{a.url}/v1/agent/check/pass/beat", headers={"X-Consul-Token": root})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{a.url}/v1/agent/checks").json()["beat"]["Status"] == "passing"


def wait_services_token(url: str, node: str, want: set[str], token: str) -> None:
    def get() -> set[str] | None:
        r = httpx.get(f"{url}/v1/catalog/node/{node}", headers={"X-Consul-Token": token})
        got = set((r.json() or {}).get("Services") or {}) if r.status_code == 200 else set()
        return got if got == want else None

    wait_until(get, timeout=15)


def test_bad_requests_are_4xx_with_the_error_shape(server, agent):
    a = agent("node-a", server.url)
    for method, path, body in [
        ("PUT", "/v1/agent/service/register", b"{nope"),
        ("PUT", "/v1/agent/service/register", b"[1]"),
        ("PUT", "/v1/agent/service/register", b'{"Name": "Bad Name"}'),
        ("PUT", "/v1/agent/service/register", b'{"Name": "x", "Check": {"TTL": "soon"}}'),
        ("PUT", "/v1/agent/check/pass/nope", b""),
        ("PUT", "/v1/agent/service/deregister/nope", b""),
        ("GET", "/v1/agent/service/register", b""),
        ("GET", "/v1/agent/services?hash=x&wait=forever", b""),
        ("PUT", "/v1/agent/check/update/x", b'{"Status": "great"}'),
        ("GET", "/v1/agent/nonsense", b""),
    ]:
        r = httpx.request(method, a.url + path, content=body)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert set(r.json()) == {"error", "code", "status"}, (path, r.text)
    big = b'{"Name": "x", "Meta": {"k": "' + b"v" * (5 * 1024 * 1024) + b'"}}'
    r = httpx.put(f"{a.url}/v1/agent/service/register", content=big)
    assert r.status_code == 413
    # Not HTTP at all: a 400 with the error shape, and the agent keeps serving.
    with socket.create_connection(("127.0.0.1", urlsplit(a.url).port)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    assert set(json.loads(body)) == {"error", "code", "status"}
    assert httpx.get(f"{a.url}/v1/agent/services").status_code == 200


def test_trellis_dev_config_dir_starts_an_agent_for_its_node(tmp_path):
    d = tmp_path / "services"
    d.mkdir()
    (d / "web.json").write_text(json.dumps({"service": {"name": "web", "port": 8080}}))
    dev = TrellisProcess(
        [
            "dev",
            *("-http-port", "0", "-dns-port", "-1", "-node", "devnode"),
            *("-data-dir", str(tmp_path / "data"), "-config-dir", str(d)),
        ]
    )
    try:
        dev.start()
        # The agent owns dev's API address ("HTTP API"); the server has a port of its own.
        line = dev.wait_for_line(r"Server API: http://")
        server_url = line.split("Server API: ")[1].strip()
        assert server_url != dev.url
        wait_services(server_url, "devnode", {"web", "consul"})  # consul: the server
        assert set(httpx.get(f"{dev.url}/v1/agent/services").json()) == {"web"}
        agent_pid = wait_until(lambda: _agent_pid(dev.pid))
    finally:
        dev.stop()
    wait_until(lambda: not Path(f"/proc/{agent_pid}").exists(), timeout=15)


def _agent_pid(parent: int) -> int | None:
    from tests.support import child_pids

    for pid in child_pids(parent):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in cmd:
            return pid
    return None


def _stub_route(stub: StubServer, *, drop_writes: bool):
    """A server stand-in that answers what an agent asks of it; with ``drop_writes``, it reads
    a K/V write and then hangs up without answering (a server dying mid-request)."""

    def route(req: Seen) -> Reply:
        if req.method == "PUT" and req.path.startswith("/v1/kv/"):
            if drop_writes:
                raise ConnectionAbortedError("the stub hangs up after reading the write")
            return stub.json(200, True)
        if req.path == "/v1/catalog/datacenters":
            return stub.json(200, ["dc1"])
        if req.path.startswith("/v1/catalog/node/"):
            return stub.json(200, None, **{"X-Consul-Index": "1"})
        if req.path.startswith("/v1/health/node/"):
            return stub.json(200, [])
        if req.path == "/v1/status/leader":
            return stub.json(200, "127.0.0.1:8300")
        return stub.json(200, True)

    return route


def test_a_forwarded_write_that_went_out_is_not_sent_again_to_the_next_server(agent):
    first, second = StubServer(), StubServer()
    try:
        first.route = _stub_route(first, drop_writes=True)
        second.route = _stub_route(second, drop_writes=False)
        a = agent("node-a", first.url, second.url)
        r = httpx.put(f"{a.url}/v1/kv/once", content=b"1", timeout=30)
        assert r.status_code == 503, r.text
        assert set(r.json()) == {"error", "code", "status"}
        assert [x for x in first.seen if x.path == "/v1/kv/once"]
        # Applied by the first server perhaps, but never sent to the second.
        assert not [x for x in second.seen if x.path == "/v1/kv/once"]
        # A read that fails the same way is safe to try again elsewhere.
        assert httpx.get(f"{a.url}/v1/status/leader").status_code == 200
    finally:
        first.close()
        second.close()


def test_shared_reads_stay_per_token_under_acls_and_roots_need_none(tmp_path, started, agent):
    """Issue 11 item 4 under default-deny ACLs: two tokens blocking on the same health read
    through the agent each get the server's answer filtered for them (the shared watches are
    per token), and the CA roots, which the server gives to any caller, come to a caller
    without a token as well."""
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    s = TrellisProcess(
        [*server_args(tmp_path / "s", workers=1, node="srv"), "-config", str(cfg)]
    ).start()
    started.append(s)
    root = httpx.put(f"{s.url}/v1/acl/bootstrap").json()["SecretID"]
    auth = {"X-Consul-Token": root}
    rules = 'service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }\n'
    r = httpx.put(f"{s.url}/v1/acl/policy", json={"Name": "web-read", "Rules": rules}, headers=auth)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{s.url}/v1/acl/token", json={"Policies": [{"Name": "web-read"}]}, headers=auth)
    reader = r.json()["SecretID"]
    reg = {"Node": "n1", "Address": "10.0.0.1", "Service": {"Service": "web", "Port": 80}}
    assert httpx.put(f"{s.url}/v1/catalog/register", json=reg, headers=auth).status_code == 200
    a = agent("node-a", s.url, extra=("-token", root))

    def read(token: str | None, index: int) -> httpx.Response:
        headers = {"X-Consul-Token": token} if token else {}
        return httpx.get(
            f"{a.url}/v1/health/service/web",
            params={"index": str(index), "wait": "2s"},
            headers=headers,
            timeout=10,
        )

    first = read(reader, 1)
    assert first.status_code == 200 and [e["Service"]["Service"] for e in first.json()] == ["web"]
    index = int(first.headers["x-consul-index"])
    # The anonymous token may read nothing: its own watch, its own (filtered) answer, even
    # with the reader's watch holding the entry under the same path and query.
    anon = read(None, 1)
    assert anon.status_code == 200 and anon.json() == []
    again = read(reader, index - 1)
    assert [e["Service"]["Service"] for e in again.json()] == ["web"]
    # Roots: no token needed on the server, so none through the agent either.
    roots = httpx.get(f"{a.url}/v1/agent/connect/ca/roots", timeout=5)
    assert roots.status_code == 200 and roots.json()["Roots"]
