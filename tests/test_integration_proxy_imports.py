"""What a real ``trellis connect proxy`` process imports.

A sidecar runs beside every service for as long as the service runs, so its memory is paid
once per service instance; most of a fresh sidecar's memory is the modules it imported
(measured, issue 10). The console script is shared with the server and the client commands,
and one stray import there (the server's settings, an HTTP library the proxy does not need,
prometheus_client without ``-metrics-addr``) costs every sidecar megabytes. RSS is a benchmark
figure (bench/proxy.py), not a test: the module set is what is checked, deterministically.

Each proxy runs with ``PYTHONPROFILEIMPORTTIME=1``: the interpreter itself reports every
module the process imports on stderr, with no help from the code under test. The modules are
read once bytes have gone both ways through a sidecar pair, so the handshake, the verdict,
the relay and the follower's first round have all run.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.proxy_support import EchoApp, ProxyProcess, exchange, free_port
from tests.support import wait_until
from tests.test_integration_proxy import register, sidecar_service

pytestmark = pytest.mark.integration

#: Never in a proxy: the control plane's stack, and libraries it has no use for.
SERVER_SIDE = {"flask", "werkzeug", "jinja2", "gunicorn", "gevent", "marshmallow", "psycopg"}
SERVER_SIDE |= {"hvac", "dnslib", "yaml", "hcl2", "lark"}
#: Not needed by the proxy: the control-plane client speaks HTTP with the standard library,
#: OpenSSL (``ssl``) verifies chains, ``trellis.proxy.der`` reads certificates and a child
#: process makes the key and CSR (``trellis.proxy.keygen``): ``cryptography`` alone would cost
#: every sidecar some 9 MB (issue 10).
UNNEEDED = {"httpx", "httpcore", "h11", "h2", "anyio", "click", "rich", "pygments"}
UNNEEDED |= {"cryptography", "_cffi_backend", "cffi"}
#: The only control-plane modules the ``trellis`` console script may load to dispatch.
DISPATCH = {"trellis.api", "trellis.api.cli", "trellis.api.cli.main", "trellis.api.cli.base"}
DISPATCH |= {"trellis.api.cli.connect"}

_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$")


def imported(proxy: ProxyProcess) -> set[str]:
    return {m.group(1) for line in proxy.lines if (m := _IMPORT_LINE.match(line))}


def top_levels(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.fixture
def dev(trellis_server):
    return trellis_server


def test_a_proxy_imports_neither_the_server_nor_what_it_does_not_use(dev, procs):
    app = EchoApp(upper=True)
    try:
        register(dev.url, sidecar_service("db", app.port, free_port()))
        env = {"PYTHONPROFILEIMPORTTIME": "1"}
        server = ProxyProcess(["-sidecar-for", "db", "-http-addr", dev.url], env=env)
        procs.append(server.start())
        up = free_port()
        client = ProxyProcess(
            ["-service", "web", "-upstream", f"db:{up}", "-http-addr", dev.url], env=env
        )
        procs.append(client.start())

        def echoes() -> bool:
            with socket.create_connection(("127.0.0.1", up), timeout=5) as c:
                return exchange(c, b"hello") == b"HELLO"

        wait_until(echoes)
        for proxy in (server, client):
            modules = imported(proxy)
            # The report is read at all: the proxy's own machinery is in it.
            assert {"trio", "trellis.proxy.reactor", "trellis.proxy.follower"} <= modules
            assert top_levels(modules) & SERVER_SIDE == set(), proxy.output()
            assert top_levels(modules) & UNNEEDED == set(), sorted(top_levels(modules) & UNNEEDED)
            # A leaf was signed and the roots read (the pair exchanged bytes over mTLS), by
            # the DER reader and the profile rules.
            assert {"trellis.proxy.der", "trellis.proxy.profile"} <= modules
            assert "prometheus_client" not in top_levels(modules)  # no -metrics-addr
            control_plane = {m for m in modules if m.startswith("trellis.api")}
            assert control_plane <= DISPATCH, sorted(control_plane - DISPATCH)
    finally:
        app.close()


def test_prometheus_client_is_loaded_only_for_metrics_addr(dev, procs):
    register(dev.url, sidecar_service("db", free_port(), free_port()))
    mport = free_port()
    p = ProxyProcess(
        ["-sidecar-for", "db", "-http-addr", dev.url, "-metrics-addr", f"127.0.0.1:{mport}"],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    procs.append(p.start())
    wait_until(lambda: _answers(mport))
    assert "prometheus_client" in top_levels(imported(p))


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False
