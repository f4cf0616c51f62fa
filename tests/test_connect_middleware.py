"""The SDK's WSGI and ASGI middleware and its fork rule, in process: real certificates
(tests/mesh_support.py), real TLS over socket pairs, a ``Service`` whose snapshot the test
publishes (no control plane), a real hypercorn for what it exposes, and a real ``fork()``."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading

import httpx
import pytest
import trio

from tests.mesh_support import MeshCA, snapshot
from tests.support import wait_until
from trellis.connect import ConnectError, Service, asgi, wsgi

pytestmark = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


@pytest.fixture(scope="module")
def other_ca() -> MeshCA:
    return MeshCA()


@pytest.fixture
def services():
    made: list[Service] = []
    yield made
    for s in made:
        s.close()


def make_service(services: list, ca: MeshCA, name: str, **kw) -> Service:
    """A ``Service`` that follows nothing: the test publishes its snapshot."""
    svc = Service(name, _start=False)
    services.append(svc)
    svc._current.publish(snapshot(ca, name, **kw))
    return svc


def tls_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """A finished handshake over a socket pair: (server side, client side) SSLSockets."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out: dict = {}

    def client() -> None:
        try:
            out["client"] = client_ctx.wrap_socket(b, server_hostname=None)
        except (OSError, ssl.SSLError) as e:
            out["client_error"] = e

    t = threading.Thread(target=client)
    t.start()
    try:
        server = server_ctx.wrap_socket(a, server_side=True)
    finally:
        t.join(10)
    return server, out["client"]


class Recorder:
    """A WSGI app that records the environ it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, environ, start_response):
        self.calls.append(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]


def call_wsgi(app, environ: dict) -> tuple[str, bytes]:
    got: dict = {}

    def start_response(status, headers):
        got["status"] = status
        got["headers"] = headers

    body = b"".join(app(environ, start_response))
    return got["status"], body


def test_wsgi_allows_by_intention_and_gives_the_app_the_peer(ca, services):
    db = make_service(services, ca, "db", intentions=[("web", "db", "allow")])
    web = snapshot(ca, "web")
    server, client = tls_pair(db.server_ssl_context(), web.tls.client)
    with server, client:
        app = Recorder()
        status, body = call_wsgi(
            wsgi.ConnectMiddleware(app, db), {"gunicorn.socket": server, "PATH_INFO": "/"}
        )
    assert (status, body) == ("200 OK", b"app")
    assert app.calls[0][wsgi.PEER_ID] == ca.uri("web")
    assert app.calls[0][wsgi.PEER_SERVICE] == "web"


def test_wsgi_refuses_a_denied_peer_before_the_app_runs(ca, services):
    db = make_service(services, ca, "db", intentions=[("web", "db", "deny")], default_allow=True)
    server, client = tls_pair(db.server_ssl_context(), snapshot(ca, "web").tls.client)
    with server, client:
        app = Recorder()
        status, body = call_wsgi(
            wsgi.ConnectMiddleware(app, lambda: db), {"gunicorn.socket": server}
        )
    assert status == "403 Forbidden"
    assert json.loads(body) == {
        "error": "Matched intention: web => db (deny)",
        "code": "permission_denied",
        "status": 403,
    }
    assert app.calls == []


def test_wsgi_refuses_when_there_is_no_peer_to_decide_on(ca, services):
    db = make_service(services, ca, "db", default_allow=True)
    app = Recorder()
    mw = wsgi.ConnectMiddleware(app, db)
    # No gunicorn.socket: another server, or gunicorn's gevent_pywsgi worker.
    status, body = call_wsgi(mw, {})
    assert status == "403 Forbidden" and "no gunicorn.socket" in json.loads(body)["error"]
    # A plain TCP connection: gunicorn with no TLS.
    a, b = socket.socketpair()
    with a, b:
        status, body = call_wsgi(mw, {"gunicorn.socket": a})
    assert status == "403 Forbidden" and "not TLS" in json.loads(body)["error"]
    # TLS with no client certificate (a server context that does not require one).
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.load_cert_chain(*_files(db))
    plain_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain_client.check_hostname = False
    plain_client.verify_mode = ssl.CERT_NONE
    server, client = tls_pair(lax, plain_client)
    with server, client:
        status, body = call_wsgi(mw, {"gunicorn.socket": server})
    assert status == "403 Forbidden"
    assert json.loads(body)["error"] == "the peer presented no certificate"
    assert app.calls == []


def _files(svc: Service) -> tuple[str, str]:
    import tempfile

    snap = svc._current.snapshot
    d = tempfile.mkdtemp()
    cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
    with open(cert, "w") as f:
        f.write(snap.leaf.cert_pem)
    with open(key, "w") as f:
        f.write(snap.tls.key_pem)
    return cert, key


def test_wsgi_decides_each_request_on_a_kept_alive_connection(ca, services):
    db = make_service(services, ca, "db", intentions=[("web", "db", "allow")])
    server, client = tls_pair(db.server_ssl_context(), snapshot(ca, "web").tls.client)
    mw = wsgi.ConnectMiddleware(Recorder(), db)
    with server, client:
        assert call_wsgi(mw, {"gunicorn.socket": server})[0] == "200 OK"
        db._current.publish(snapshot(ca, "db", intentions=[("web", "db", "deny")]))
        assert call_wsgi(mw, {"gunicorn.socket": server})[0] == "403 Forbidden"


def test_worker_service_is_found_by_name_and_refuses_before_post_fork():
    ws = wsgi.WorkerService("h26-unstarted", address="http://127.0.0.1:1")
    assert wsgi.worker_service("h26-unstarted") is ws
    with pytest.raises(ConnectError, match="set post_fork"):
        ws()
    with pytest.raises(ConnectError, match="no WorkerService 'nobody'"):
        wsgi.worker_service("nobody")


# -- ASGI ------------------------------------------------------------------------------------


def _pem_chain(ca: MeshCA, name: str) -> list[str]:
    return [ca.leaf(name).cert_pem]


async def _call_asgi(mw, scope: dict) -> tuple[list[dict], list[dict]]:
    """Run the middleware on ``scope``; what it sent, and the scopes the app got."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await mw(scope, receive, send)
    return sent


class AsgiRecorder:
    def __init__(self, *, lifespan: bool = False) -> None:
        self.scopes: list[dict] = []
        self.lifespan = lifespan

    async def __call__(self, scope, receive, send):
        self.scopes.append(scope)
        if scope["type"] == "lifespan" and self.lifespan:
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"app"})


def _http_scope(tls: dict | None) -> dict:
    ext = {} if tls is None else {"tls": tls}
    return {"type": "http", "method": "GET", "path": "/", "headers": [], "extensions": ext}


def _refusal(sent: list[dict]) -> str:
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 403, sent
    body = json.loads(sent[1]["body"])
    assert (body["code"], body["status"]) == ("permission_denied", 403)
    return body["error"]


def test_asgi_allows_by_intention_from_the_tls_extension(ca, services):
    db = make_service(services, ca, "db", intentions=[("web", "db", "allow")])
    app = AsgiRecorder()
    mw = asgi.ConnectMiddleware(app, db)
    for chain in (_pem_chain(ca, "web"), _pem_chain(ca, "web")[0]):  # a list, or one string
        sent = trio.run(_call_asgi, mw, _http_scope({"client_cert_chain": chain}))
        assert sent[0]["status"] == 200
    assert app.scopes[0][asgi.PEER_ID] == ca.uri("web")
    assert app.scopes[0][asgi.PEER_SERVICE] == "web"


def test_asgi_refuses_denied_forged_and_missing_peers_before_the_app(ca, other_ca, services):
    db = make_service(services, ca, "db", intentions=[("web", "db", "deny")], default_allow=True)
    app = AsgiRecorder()
    mw = asgi.ConnectMiddleware(app, lambda: db)

    def refusal(tls: dict | None) -> str:
        return _refusal(trio.run(_call_asgi, mw, _http_scope(tls)))

    assert refusal({"client_cert_chain": _pem_chain(ca, "web")}) == (
        "Matched intention: web => db (deny)"
    )
    # Signed by a key the roots do not hold: the chain is verified, not believed.
    assert "does not verify" in refusal({"client_cert_chain": _pem_chain(other_ca, "api")})
    assert refusal({"client_cert_chain": []}) == "the peer presented no certificate"
    assert refusal({}) == "the peer presented no certificate"
    assert "does not parse" in refusal({"client_cert_chain": ["-----BEGIN CERTIFICATE-----\nxx"]})
    assert "does not parse" in refusal({"client_cert_chain": [7]})
    assert refusal(None) == asgi.NO_EXTENSION
    assert refusal("not a dict") == asgi.NO_EXTENSION  # type: ignore[arg-type]
    assert app.scopes == []


def test_asgi_passes_lifespan_and_closes_a_refused_websocket(ca, services):
    db = make_service(services, ca, "db")
    app = AsgiRecorder()
    mw = asgi.ConnectMiddleware(app, db)
    trio.run(_call_asgi, mw, {"type": "lifespan"})
    assert app.scopes == [{"type": "lifespan"}]
    sent = trio.run(_call_asgi, mw, {"type": "websocket", "extensions": {}})
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": asgi.NO_EXTENSION[:120]}]


def test_hypercorn_exposes_no_tls_extension_so_the_middleware_refuses(ca, services):
    """What hypercorn really gives: over its TLS (our context, a valid mesh client), the
    scope has no ``tls`` extension, so every request is refused, never let through."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    db = make_service(services, ca, "db", default_allow=True)
    app = AsgiRecorder(lifespan=True)

    class ConnectConfig(Config):
        @property
        def ssl_enabled(self) -> bool:
            return True

        def create_ssl_context(self) -> ssl.SSLContext:
            return db.server_ssl_context()

    config = ConnectConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    web = snapshot(ca, "web")

    async def main() -> httpx.Response:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    asgi.ConnectMiddleware(app, db),
                    config,
                    shutdown_trigger=trio.sleep_forever,
                    task_status=task_status,
                )
            )
            port = int(binds[0].rsplit(":", 1)[1])
            async with httpx.AsyncClient(verify=web.tls.client, timeout=10) as client:
                r = await client.get(f"https://127.0.0.1:{port}/")
            nursery.cancel_scope.cancel()
        return r

    r = trio.run(main)
    assert r.status_code == 403
    assert r.json()["error"] == asgi.NO_EXTENSION
    assert [s["type"] for s in app.scopes] == ["lifespan"]  # the request never reached it


# -- fork --------------------------------------------------------------------------------------


def test_a_service_made_before_a_fork_fails_clearly_in_the_child(ca, services):
    db = make_service(services, ca, "db", default_allow=True)
    web = snapshot(ca, "web")
    ctx = db.server_ssl_context()
    server, client = tls_pair(ctx, web.tls.client)  # served in the parent
    server.close()
    client.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it saw through the pipe, then leave at once
        os.close(r)
        seen = {}
        try:
            for what, call in (
                ("ready", lambda: db.ready(1)),
                ("authorize", lambda: db.authorize(b"")),
                ("connect", lambda: db.connect("api", timeout=1)),
                ("server_ssl_context", db.server_ssl_context),
            ):
                try:
                    call()
                    seen[what] = "no error"
                except ConnectError as e:
                    seen[what] = str(e)
            try:  # the context obtained before the fork: no handshake in the child
                s, c = tls_pair(ctx, web.tls.client)
                s.close()
                c.close()
                seen["handshake"] = "served"
            except (OSError, ssl.SSLError) as e:
                seen["handshake"] = type(e).__name__
            db.close()  # nothing to stop here: returns at once
            seen["closed"] = True
        finally:
            os.write(w, json.dumps(seen).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        seen = json.loads(f.read())
    os.waitpid(pid, 0)
    for what in ("ready", "authorize", "connect", "server_ssl_context"):
        assert "was made in process" in seen[what] and "before a fork" in seen[what], seen
    assert seen["handshake"] != "served", seen
    assert seen["closed"] is True
    db.authorize(b"")  # the parent's Service is untouched


def test_a_service_refuses_a_process_whose_threads_gevent_patched():
    """gunicorn's gevent worker patches after post_fork; a Service made after that (or an
    app that patched itself) would have its follower stall at its first blocking call."""
    code = (
        "from gevent import monkey; monkey.patch_all()\n"
        "from trellis.connect import ConnectError, Service\n"
        "try:\n"
        "    Service('web', address='http://127.0.0.1:1')\n"
        "except ConnectError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: gevent's monkey-patching has made threads greenlets")


@pytest.mark.integration
def test_asgi_end_to_end_over_a_server_that_fills_the_tls_extension(trellis_server, services):
    """A real control plane, real TLS: ``web`` calls ``db`` (the ASGI middleware behind a
    server that fills the TLS extension, TLS by ``db.server_ssl_context()``) with the SDK's
    httpx transport; allowed, then 403 after ``trellis intention create -deny``."""
    from tests.connect_support import TLSExtensionASGI
    from tests.test_integration_proxy import cli, register

    url = trellis_server.url
    db = Service("db", address=url)
    services.append(db)
    db.ready(timeout=30)
    app = AsgiRecorder()
    srv = TLSExtensionASGI(asgi.ConnectMiddleware(app, db), db.server_ssl_context())
    try:
        register(
            url,
            {"Name": "db", "Address": "127.0.0.1", "Port": srv.port, "Connect": {"Native": True},
             "Check": {"TTL": "1h", "Status": "passing"}},
        )  # fmt: skip
        web = Service("web", address=url)
        services.append(web)
        web.ready(timeout=30)
        with httpx.Client(transport=web.httpx_transport(), timeout=10) as h:
            r = h.get("http://db/hello")
            assert (r.status_code, r.text) == (200, "app")
            assert app.scopes[0][asgi.PEER_SERVICE] == "web"
            assert app.scopes[0][asgi.PEER_ID].endswith("/dc/dc1/svc/web")
            assert cli(url, "intention", "create", "-deny", "web", "db").returncode == 0
            wait_until(lambda: h.get("http://db/after").status_code == 403, timeout=15)
            assert h.get("http://db/after").json()["error"] == "Matched intention: web => db (deny)"
        assert len(app.scopes) == 1
    finally:
        srv.close()
