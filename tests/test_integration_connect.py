"""The native SDK for real: ``trellis dev``, ``Service`` objects in this process, native
servers on real sockets, and ``trellis connect proxy`` sidecars on the other side.

Every process is a ``TrellisProcess`` or ``ProxyProcess`` ended by PID by its fixture; every
``Service`` and native server is closed by the ``native`` fixture, also on failure."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
import trio

from tests.connect_support import NativeEcho, NativeHTTP
from tests.proxy_support import EchoApp, ProxyProcess, exchange, free_port
from tests.support import TrellisProcess, wait_until
from tests.test_integration_proxy import cli, register, sidecar_service
from trellis.connect import ConnectError, Service, open_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning"),
]

PASSING = {"TTL": "1h", "Status": "passing"}


@pytest.fixture
def native():
    """Services and native servers a test makes; closed at the end, whatever happened."""
    made: list = []
    yield made
    for thing in reversed(made):
        thing.close()


def service(native: list, name: str, url: str) -> Service:
    svc = Service(name, address=url)
    native.append(svc)
    svc.ready(timeout=30)
    return svc


def native_server(native: list, svc: Service, url: str, *, instance: str = "") -> NativeEcho:
    srv = NativeEcho(svc)
    native.append(srv)
    register(
        url,
        {
            "Name": svc.name,
            "ID": instance or svc.name,
            "Address": "127.0.0.1",
            "Port": srv.port,
            "Connect": {"Native": True},
            "Check": PASSING,
        },
    )
    return srv


def echoes(sock: socket.socket, text: bytes) -> bool:
    try:
        return exchange(sock, text) == text.upper()
    finally:
        sock.close()


def test_native_client_to_native_server_allowed_then_denied(trellis_server, native):
    url = trellis_server.url
    db = service(native, "db", url)
    srv = native_server(native, db, url)
    web = service(native, "web", url)

    assert echoes(web.connect("db"), b"hello native")

    async def over_asyncio() -> bytes:
        reader, writer = await web.connect_async("db")
        writer.write(b"asyncio")
        await writer.drain()
        got = await reader.readexactly(7)
        writer.close()
        # Let the TLS close finish before asyncio.run ends the loop: a transport still
        # closing then is "unclosed" when collected (a ResourceWarning in a later test).
        await writer.wait_closed()
        return got

    assert asyncio.run(over_asyncio()) == b"ASYNCIO"

    async def over_trio() -> bytes:
        stream = await web.connect_trio("db")
        async with stream:
            await stream.send_all(b"trio")
            got = b""
            while len(got) < 4:
                got += await stream.receive_some(10)
            return got

    assert trio.run(over_trio) == b"TRIO"

    # A deny: db's next decision refuses web before reading a byte; the client sees the
    # connection closed with nothing echoed.
    r = cli(url, "intention", "create", "-deny", "web", "db")
    assert r.stdout.strip() == "Created: web => db (deny)", r.stderr
    wait_until(lambda: not echoes(web.connect("db"), b"after deny"), timeout=10)
    assert "Matched intention: web => db (deny)" in srv.refused


def test_connect_tries_the_next_healthy_instance(trellis_server, native):
    url = trellis_server.url
    db = service(native, "db", url)
    native_server(native, db, url, instance="db-live")
    # A second healthy instance whose port nobody listens on.
    register(
        url,
        {
            "Name": "db",
            "ID": "db-dead",
            "Address": "127.0.0.1",
            "Port": free_port(),
            "Connect": {"Native": True},
            "Check": PASSING,
        },
    )
    web = service(native, "web", url)
    web.connect("db").close()  # follows db from here on
    wait_until(lambda: len(web._current.endpoints("db")) == 2)
    for i in range(4):  # round-robin starts on each instance in turn: none fails
        assert echoes(web.connect("db"), b"try %d" % i)


def test_connect_refuses_a_server_with_another_identity(trellis_server, native):
    url = trellis_server.url
    # "api"'s server registered under the name "db": its leaf says api, not db.
    api = service(native, "api", url)
    srv = NativeEcho(api)
    native.append(srv)
    register(
        url,
        {
            "Name": "db",
            "Address": "127.0.0.1",
            "Port": srv.port,
            "Connect": {"Native": True},
            "Check": PASSING,
        },
    )
    web = service(native, "web", url)
    with pytest.raises(ConnectError, match=r"the server is spiffe://\S+/svc/api, expected"):
        web.connect("db")


def test_no_healthy_instance_is_a_connect_error(trellis_server, native):
    web = service(native, "web", trellis_server.url)
    with pytest.raises(ConnectError, match="nothing: no healthy instance"):
        web.connect("nothing")


def test_native_client_to_a_sidecar(trellis_server, native, procs, apps):
    url = trellis_server.url
    db_app = EchoApp(upper=True)
    apps.append(db_app)
    register(url, sidecar_service("db", db_app.port, free_port()))
    procs.append(ProxyProcess(["-sidecar-for", "db", "-http-addr", url]).start())
    web = service(native, "web", url)
    sock = wait_until(lambda: web.connect("db", timeout=10), timeout=15)
    assert echoes(sock, b"native to sidecar")


def test_sidecar_to_a_native_server(trellis_server, native, procs):
    url = trellis_server.url
    db = service(native, "db", url)
    native_server(native, db, url)
    up_port = free_port()
    register(url, sidecar_service("web", free_port(), free_port(), [("db", up_port)]))
    procs.append(ProxyProcess(["-sidecar-for", "web", "-http-addr", url]).start())

    def through_sidecar() -> bool:
        return echoes(socket.create_connection(("127.0.0.1", up_port), timeout=5), b"to native")

    wait_until(through_sidecar, timeout=15)


def test_open_service_runs_the_follower_in_the_callers_trio_run(trellis_server, native):
    url = trellis_server.url
    db = service(native, "db", url)
    native_server(native, db, url)

    async def main() -> bytes:
        async with open_service("web", address=url) as web:
            stream = await web.connect_trio("db")
            async with stream:
                await stream.send_all(b"nursery")
                got = b""
                while len(got) < 7:
                    got += await stream.receive_some(10)
        with pytest.raises(ConnectError):
            await web.connect_trio("db")
        return got

    assert trio.run(main) == b"NURSERY"


def test_serve_connect_serves_allowed_peers_and_refuses_denied_ones(trellis_server, native):
    url = trellis_server.url
    web = service(native, "web", url)
    served: list[bytes] = []

    async def upper(stream: trio.SSLStream) -> None:
        while data := await stream.receive_some(65536):
            served.append(data)
            await stream.send_all(data.upper())

    async def main() -> None:
        async with open_service("db", address=url) as db, trio.open_nursery() as nursery:
            await trio.to_thread.run_sync(db.ready)
            listeners = await nursery.start(db.serve_connect, upper, 0)
            port = listeners[0].socket.getsockname()[1]
            await trio.to_thread.run_sync(
                register,
                url,
                {
                    "Name": "db",
                    "Address": "127.0.0.1",
                    "Port": port,
                    "Connect": {"Native": True},
                    "Check": PASSING,
                },
            )
            ok = await trio.to_thread.run_sync(lambda: echoes(web.connect("db"), b"served"))
            assert ok
            r = await trio.to_thread.run_sync(cli, url, "intention", "create", "-deny", "web", "db")
            assert r.returncode == 0, r.stderr
            await trio.to_thread.run_sync(
                lambda: wait_until(lambda: not echoes(web.connect("db"), b"denied"))
            )
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert served == [b"served"]


def test_httpx_transport_sync_asyncio_and_trio_then_403(trellis_server, native):
    url = trellis_server.url
    db = service(native, "db", url)
    srv = NativeHTTP(db)
    native.append(srv)
    register(
        url,
        {
            "Name": "db",
            "Address": "127.0.0.1",
            "Port": srv.port,
            "Connect": {"Native": True},
            "Check": PASSING,
        },
    )
    web = service(native, "web", url)
    transport = web.httpx_transport()
    native.append(transport)

    with httpx.Client(transport=transport, timeout=10) as client:
        r = client.get("http://db/hello?x=1")
        assert (r.status_code, r.text) == (200, "GET /hello?x=1 ")
        r = client.post("http://db:8080/form", content=b"payload")  # the port is ignored
        assert (r.status_code, r.text) == (200, "POST /form payload")
        with pytest.raises(httpx.UnsupportedProtocol):
            client.get("https://db/")
        with pytest.raises(httpx.ConnectError, match="nothing: no healthy instance"):
            client.get("http://nothing/")

    async def call() -> tuple[int, str]:
        async with httpx.AsyncClient(transport=web.httpx_transport(), timeout=10) as client:
            r = await client.get("http://db/async")
            return r.status_code, r.text

    assert asyncio.run(call()) == (200, "GET /async ")
    assert trio.run(call) == (200, "GET /async ")

    r = cli(url, "intention", "create", "-deny", "web", "db")
    assert r.returncode == 0, r.stderr

    def forbidden() -> bool:
        with httpx.Client(transport=web.httpx_transport(), timeout=10) as client:
            r = client.get("http://db/after")
        return r.status_code == 403 and r.text == "Matched intention: web => db (deny)"

    wait_until(forbidden)


@pytest.mark.slow
def test_a_root_rotation_during_a_stream_of_calls_fails_none(trellis_server, native):
    url = trellis_server.url
    db = service(native, "db", url)
    native_server(native, db, url)
    web = service(native, "web", url)
    results: list[bool | str] = []
    stop = threading.Event()

    def calls() -> None:  # a new connection (two handshakes) per call, until told to stop
        while not stop.is_set():
            try:
                results.append(echoes(web.connect("db", timeout=10), b"call"))
            except (ConnectError, OSError) as e:
                results.append(str(e))

    before = {s.name: s._current.snapshot.leaf.serial for s in (db, web)}
    old_root = httpx.get(url + "/v1/connect/ca/roots", timeout=10).json()["ActiveRootID"]
    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    try:
        wait_until(lambda: len(results) >= 20)
        r = httpx.put(
            url + "/v1/connect/ca/configuration",
            json={"Provider": "builtin", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        new_root = httpx.get(url + "/v1/connect/ca/roots", timeout=10).json()["ActiveRootID"]
        assert new_root != old_root  # a root rotation, not a renewal under the same root
        # Each side re-signs within 30 s of the new root (jittered), and serves it at once.
        wait_until(
            lambda: all(
                s._current.snapshot.leaf.serial != before[s.name]
                and s._current.snapshot.roots.active_id == new_root
                for s in (db, web)
            ),
            timeout=45,
        )
        done = len(results)
        wait_until(lambda: len(results) >= done + 20)
    finally:
        stop.set()
        caller.join(15)
    failures = [r for r in results if r is not True]
    assert failures == [], failures[:5]


def test_a_token_that_may_not_act_as_the_service_is_a_connect_error(tmp_path, native):
    cfg = tmp_path / "acl.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    server = TrellisProcess(
        ["server", "-config", str(cfg), "-data-dir", str(tmp_path / "d"), "-http-port", "0",
         "-dns-port", "-1", "-workers", "1", "-node", "n1"]
    ).start()  # fmt: skip
    try:
        boot = httpx.put(server.url + "/v1/acl/bootstrap", timeout=10).json()["SecretID"]
        h = {"X-Consul-Token": boot}
        pol = httpx.put(
            server.url + "/v1/acl/policy",
            headers=h,
            timeout=10,
            json={"Name": "read-only", "Rules": 'service_prefix "" { policy = "read" }'},
        ).json()
        tok = httpx.put(
            server.url + "/v1/acl/token",
            headers=h,
            timeout=10,
            json={"Policies": [{"ID": pol["ID"]}]},
        ).json()["SecretID"]
        svc = Service("alice", address=server.url, token=tok)
        native.append(svc)
        with pytest.raises(ConnectError, match="may not act as service 'alice'"):
            svc.ready(timeout=30)
        svc._thread.join(10)  # the follower's run has ended: still the refusal, not "closed"
        assert not svc._thread.is_alive()
        with pytest.raises(ConnectError, match="may not act"):
            svc.connect("db")
    finally:
        server.stop()


def test_no_control_plane_is_a_timeout_and_close_is_final(native):
    svc = Service("web", address=f"http://127.0.0.1:{free_port()}")
    native.append(svc)
    with pytest.raises(TimeoutError, match=r"no leaf, roots and intentions within 0\.5 s"):
        svc.ready(timeout=0.5)
    svc.close()
    with pytest.raises(ConnectError, match="the service is closed"):
        svc.ready(timeout=5)
    with pytest.raises(ConnectError, match="the service is closed"):
        svc.connect("db", timeout=5)
    svc.close()  # twice: nothing more to do


@pytest.mark.parametrize("call", ["connect", "connect_async", "connect_trio"])
def test_a_wildcard_destination_is_the_callers_mistake_said_at_once(native, call):
    # '*' names no service to dial: a ValueError before any wait, as Service("*") is, not a
    # wait for an instance list that the follower would ask the catalog for under that name.
    svc = Service("web", address=f"http://127.0.0.1:{free_port()}")
    native.append(svc)
    fn = getattr(svc, call)
    with pytest.raises(ValueError, match="not '\\*'"):
        if call == "connect":
            fn("*", timeout=2)
        elif call == "connect_async":
            asyncio.run(fn("*", timeout=2))
        else:
            trio.run(lambda: fn("*", timeout=2))
    with pytest.raises(ValueError, match="is not valid"):
        svc.connect("we b", timeout=2)
