"""The native SDK's examples (examples/) as real processes against a real ``trellis dev``: the
Flask app under gunicorn (examples/flask-web), the trio backend (examples/trio-backend), and a
plain app behind a ``trellis connect proxy`` sidecar (examples/interop), run as their READMEs
say. The caller is a native ``Service`` in this process, or the sidecar.

Every process is an ``OutputProcess`` (or ``ProxyProcess``) in its own session, ended by PID
(its whole process group) by the ``running`` fixture, also when the test fails."""

from __future__ import annotations

import re
import socket
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.proxy_support import ProxyProcess, free_port
from tests.support import OutputProcess, wait_until
from tests.test_integration_proxy import cli, register, sidecar_service
from trellis.connect import ConnectError, Service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning"),
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
PASSING = {"TTL": "1h", "Status": "passing"}


class Example(OutputProcess):
    """An example's process (any command, not ``trellis``), ready once ``ready`` matches a
    line of its output."""

    def __init__(self, args: list[str], ready: str, *, env: dict[str, str]) -> None:
        super().__init__([], env=env)
        self.args = args
        self.ready_pattern = ready

    def start(self, timeout: float = 60.0) -> Example:
        self._spawn()
        self.ready_line = self.wait_for_line(self.ready_pattern, timeout)
        return self


@pytest.fixture
def running():
    """Processes a test starts, and Services it makes: all ended at the end, whatever
    happened (processes by PID, their whole group)."""
    started: list = []
    yield started
    for p in reversed(started):
        if isinstance(p, Service):
            p.close()
        else:
            p.stop()


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {"TRELLIS_HTTP_ADDR": url, **extra}


def start_backend(running: list, url: str) -> Example:
    p = Example(
        [PYTHON, str(EXAMPLES / "trio-backend" / "backend.py"), "-register"],
        r"backend: registered as",
        env=env_for(url),
    )
    running.append(p)
    return p.start()


def start_web(running: list, url: str, worker_class: str = "sync") -> Example:
    """gunicorn with the example's config, on a free port, registered as Connect-native."""
    p = Example(
        [GUNICORN, "--no-control-socket", "-c", str(EXAMPLES / "flask-web" / "gunicorn.conf.py"),
         "--chdir", str(EXAMPLES / "flask-web"), "app:app"],
        r"Booting worker with pid",
        env=env_for(url, WEB_BIND="127.0.0.1:0", WEB_WORKER_CLASS=worker_class),
    )  # fmt: skip
    running.append(p)
    p.start()
    m = re.search(r"Listening at: https://127\.0\.0\.1:(\d+)", p.wait_for_line("Listening at"))
    assert m, p.output()
    p.port = int(m.group(1))
    register(
        url,
        {"Name": "web", "Address": "127.0.0.1", "Port": p.port, "Connect": {"Native": True},
         "Check": PASSING},
    )  # fmt: skip
    return p


def client(running: list, url: str) -> Service:
    svc = Service("client", address=url)
    running.append(svc)
    svc.ready(timeout=30)
    return svc


def get(svc: Service, path: str, **kw) -> httpx.Response:
    with httpx.Client(transport=svc.httpx_transport(), timeout=15) as h:
        return h.get("http://web" + path, **kw)


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_flask_calls_the_trio_backend_and_denials_refuse_both(
    trellis_server, running, worker_class
):
    url = trellis_server.url
    backend = start_backend(running, url)
    web = start_web(running, url, worker_class)
    me = client(running, url)

    r = wait_until(lambda: (r := get(me, "/")).status_code == 200 and r, timeout=30)
    assert r.json()["peer"] == "client" and r.json()["peer_id"].endswith("/svc/client")
    r = get(me, "/call/backend", params={"text": "hello"})
    assert (r.status_code, r.json()) == (200, {"service": "backend", "reply": "backend: HELLO"})

    # TCP: a deny of web => backend; the backend closes web's connection before reading.
    assert cli(url, "intention", "create", "-deny", "web", "backend").returncode == 0
    r = wait_until(lambda: (r := get(me, "/call/backend")).status_code == 502 and r, timeout=15)
    assert "closed the connection without answering" in r.json()["error"]
    backend.wait_for_line(r"refused a peer: Matched intention: web => backend \(deny\)")

    # HTTP: a deny of client => web; the middleware answers 403 before the app runs (each
    # worker follows the intentions on its own: the first 403 is from whichever has it).
    assert cli(url, "intention", "create", "-deny", "client", "web").returncode == 0
    r = wait_until(lambda: (r := get(me, "/")).status_code == 403 and r, timeout=15)
    assert r.json() == {
        "error": "Matched intention: client => web (deny)",
        "code": "permission_denied",
        "status": 403,
    }
    assert web.proc.poll() is None


def test_the_gevent_worker_is_refused_at_boot_with_the_reason(trellis_server, running):
    p = Example(
        [GUNICORN, "--no-control-socket", "-c", str(EXAMPLES / "flask-web" / "gunicorn.conf.py"),
         "--chdir", str(EXAMPLES / "flask-web"), "app:app"],
        r"Reason: Worker failed to boot",
        env=env_for(trellis_server.url, WEB_BIND="127.0.0.1:0", WEB_WORKER_CLASS="gevent"),
    )  # fmt: skip
    running.append(p)
    p.start()
    assert p.wait(30) == 3
    assert any("gevent's monkey-patching has made threads greenlets" in x for x in p.lines)


def test_native_and_sidecar_services_call_each_other(trellis_server, running):
    url = trellis_server.url
    start_backend(running, url)
    start_web(running, url)
    legacy = Example(
        [PYTHON, str(EXAMPLES / "interop" / "legacy.py")],
        r"legacy: serving plain TCP on",
        env=env_for(url),
    )
    running.append(legacy)
    legacy.start()
    legacy_port = int(legacy.ready_line.split(":")[-1].split()[0])
    up_web, up_backend = free_port(), free_port()
    register(
        url,
        sidecar_service(
            "legacy", legacy_port, free_port(), [("web", up_web), ("backend", up_backend)]
        ),
    )
    sidecar = ProxyProcess(["-sidecar-for", "legacy", "-http-addr", url])
    running.append(sidecar)
    sidecar.start()
    me = client(running, url)

    # native -> sidecar: the Flask app (Service.connect) to legacy, through legacy's sidecar.
    r = wait_until(
        lambda: (r := get(me, "/call/legacy", params={"text": "hi"})).status_code == 200 and r,
        timeout=30,
    )
    assert r.json() == {"service": "legacy", "reply": "legacy: HI"}

    # sidecar -> native: legacy's sidecar upstreams to gunicorn (HTTP) and the trio backend.
    def through_sidecar_to_web() -> httpx.Response | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{up_web}/", timeout=10)
        except httpx.HTTPError:
            return None
        return r if r.status_code == 200 else None

    r = wait_until(through_sidecar_to_web, timeout=30)
    assert r.json()["peer"] == "legacy"

    def through_sidecar_to_backend() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", up_backend), timeout=10) as s:
                s.sendall(b"from legacy\n")
                got = b""
                while not got.endswith(b"\n") and (chunk := s.recv(100)):
                    got += chunk
                return got
        except OSError:
            return b""

    assert wait_until(through_sidecar_to_backend, timeout=30) == b"backend: FROM LEGACY\n"


def _issuer(svc: Service, name: str) -> str:
    """The key ID of the CA key that signed the leaf ``name`` presents now."""
    with svc.connect(name, timeout=10) as sock:
        verdict = svc._current.snapshot.tls.peers.verdict(sock.getpeercert(binary_form=True))
    return verdict.issuer_key_id.replace(":", "").lower()


@pytest.mark.slow
def test_a_root_rotation_during_a_stream_of_calls_fails_none(trellis_server, running):
    url = trellis_server.url
    start_backend(running, url)
    start_web(running, url)
    me = client(running, url)
    wait_until(lambda: get(me, "/").status_code == 200, timeout=30)
    results: list[bool | str] = []
    stop = threading.Event()

    def calls() -> None:
        # Each call: new connections client -> web (Connection: close) and web -> backend,
        # so every call makes two handshakes with whatever leaves and roots are current.
        with httpx.Client(transport=me.httpx_transport(), timeout=15) as h:
            while not stop.is_set():
                try:
                    r = h.get(
                        "http://web/call/backend",
                        params={"text": "call"},
                        headers={"Connection": "close"},
                    )
                    ok = r.status_code == 200 and r.json()["reply"] == "backend: CALL"
                    results.append(True if ok else f"{r.status_code} {r.text}")
                except (httpx.HTTPError, ConnectError) as e:
                    results.append(repr(e))

    before = _issuer(me, "web")
    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    try:
        wait_until(lambda: len(results) >= 20, timeout=30)
        r = httpx.put(
            url + "/v1/connect/ca/configuration",
            json={"Provider": "builtin", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        roots = httpx.get(url + "/v1/connect/ca/roots", timeout=10).json()
        active = next(x for x in roots["Roots"] if x["Active"])
        new_key = active["SigningKeyID"].replace(":", "").lower()
        assert new_key != before
        # Each side re-signs within 30 s of the new root (jittered): the backend, and six
        # connections in a row to web (which of the two workers accepts each is the
        # kernel's choice), present leaves of the new key.
        wait_until(
            lambda: all(_issuer(me, n) == new_key for n in ("backend",) + ("web",) * 6),
            timeout=60,
        )
        done = len(results)
        wait_until(lambda: len(results) >= done + 20, timeout=30)
    finally:
        stop.set()
        caller.join(20)
    failures = [r for r in results if r is not True]
    assert failures == [], failures[:5]
