"""Certificates change under traffic: a sidecar pair keeps carrying requests, with zero
failures, while its leaves are renewed, the CA root is rotated (cross-signed), and the CA
provider is switched to Vault (a real OpenBao) and back (issue 10, "How it is checked").

Everything is real: a ``trellis server`` subprocess, two ``trellis connect proxy
-sidecar-for`` processes, an echo app, OpenBao. Two streams of requests run through the
client sidecar's upstream port the whole time: one opens a new connection (two mutual-TLS
handshakes) for every request, the other is one connection that carries a request every few
milliseconds from the first phase to the last and must never break.

The shortest LeafCertTTL the CA takes is Consul's 1h, renewed 36-54 minutes in: too long for
a test. The server is told to accept shorter ones (``connect.min_leaf_cert_ttl``, a server
setting made for this), and the CA signs 30 s leaves, which the proxies renew 18-27 s after
they get them, and within 3 s of a root change (a tenth of the leaf's life). Old roots are
pruned 2 x LeafCertTTL after they stop being active, which is after this test ends: a pruned
root would rightly cut the long-lived connection, whose peer presented a leaf of it.

Which root signed a proxy's leaf is read from its log line ``leaf certificate SERIAL for URI
(root ID), valid until ...``.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time

import httpx
import pytest

from tests import vault_fixtures
from tests.proxy_support import EchoApp, ProxyProcess, exchange, free_port
from tests.support import TrellisProcess, server_args, wait_until
from trellis.proxy import x509 as px

openbao = vault_fixtures.openbao
vault_paths = vault_fixtures.vault_paths

pytestmark = pytest.mark.integration

LEAF_TTL = "30s"
PASSING = [{"Name": "listening", "TTL": "1h", "Status": "passing"}]
LEAF_LINE = re.compile(r"leaf certificate (\S+) for (\S+) \(root (\S+)\)")


@pytest.fixture
def server(tmp_path):
    """A real ``trellis server`` whose CA signs 30 s leaves, with two workers (the default):
    each caches the CA's state for signing and hears of the other's rotation a few
    milliseconds late, as replicas do."""
    cfg = tmp_path / "server.json"
    cfg.write_text(
        json.dumps(
            {"connect": {"min_leaf_cert_ttl": "10s", "ca_config": {"leaf_cert_ttl": LEAF_TTL}}}
        )
    )
    p = TrellisProcess(
        [*server_args(tmp_path / "data", workers=2, node="rotation"), "-config", str(cfg)]
    ).start()
    yield p
    p.stop()


def register(url: str, body: dict) -> None:
    r = httpx.put(url + "/v1/agent/service/register", json=body, timeout=10)
    assert r.status_code == 200, r.text


def sidecar_service(name: str, app_port: int, upstreams=()) -> dict:
    proxy = {"Upstreams": [{"DestinationName": d, "LocalBindPort": p} for d, p in upstreams]}
    return {
        "Name": name,
        "Port": app_port,
        "Address": "127.0.0.1",
        "Connect": {"SidecarService": {"Port": free_port(), "Checks": PASSING, "Proxy": proxy}},
    }


def leaves(p: ProxyProcess) -> list[tuple[str, str]]:
    """(serial, root ID) of every leaf the proxy got, in order."""
    return [(m.group(1), m.group(3)) for line in list(p.lines) if (m := LEAF_LINE.search(line))]


def served_serial(port: int) -> str:
    """The serial of the leaf a public listener presents to a new connection. A TLS 1.3
    client's handshake is over once it has sent its Finished, before the proxy finds that it
    sent no certificate and closes; the certificate is read, nothing else is asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only looking: the proxies check each other for real
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as t:
            der = t.getpeercert(binary_form=True)
    assert der is not None
    return px.serial_hex(px.load_certs(ssl.DER_cert_to_PEM_cert(der))[0].serial_number)


def active_root(url: str) -> str:
    r = httpx.get(url + "/v1/connect/ca/roots", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["ActiveRootID"]


def set_ca(url: str, body: dict) -> str:
    """PUT the CA configuration; returns the new active root's ID (it must have changed)."""
    before = active_root(url)
    r = httpx.put(url + "/v1/connect/ca/configuration", json=body, timeout=60)
    assert r.status_code == 200, r.text
    after = active_root(url)
    assert after != before
    return after


class Traffic:
    """Two streams through ``port`` until ``stop``: new connections (one request each) and
    one long-lived connection. Every outcome is recorded; the long-lived stream ends at its
    first failure (which the test reports)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.fresh: list[bool] = []
        self.steady: list[bool] = []
        self.steady_error = ""
        self._threads = [
            threading.Thread(target=self._fresh, daemon=True),
            threading.Thread(target=self._steady, daemon=True),
        ]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def _fresh(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            text = b"fresh %d" % n
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                    self.fresh.append(exchange(c, text) == text.upper())
            except OSError:
                self.fresh.append(False)
            self.stop.wait(0.02)  # pace: two handshakes per request on a shared machine

    def _steady(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    text = b"steady %d" % n
                    got = exchange(c, text)
                    self.steady.append(got == text.upper())
                    if got != text.upper():
                        self.steady_error = f"request {n} got {got!r}"
                        return
                    self.stop.wait(0.01)
        except OSError as e:
            self.steady.append(False)
            self.steady_error = repr(e)

    def flowing(self, more: int = 20, timeout: float = 30.0) -> None:
        """Wait until both streams have served ``more`` requests past this point."""
        f0, s0 = len(self.fresh), len(self.steady)

        def served() -> bool | str:
            both = len(self.fresh) >= f0 + more and len(self.steady) >= s0 + more
            return both or self.steady_error

        wait_until(served, timeout=timeout)
        self.check()

    def check(self) -> None:
        assert not self.steady_error, f"the long-lived connection broke: {self.steady_error}"
        failed = self.fresh.count(False)
        assert failed == 0, f"{failed} of {len(self.fresh)} new connections failed"


def moved_to(sidecars: list[ProxyProcess], root: str, timeout: float = 20.0) -> None:
    """Wait until every sidecar's newest leaf is signed under ``root`` and the server side's
    public listener (never restarted) presents it to new connections."""
    public = sidecars[0].listening["public"][1]

    def on_root() -> bool:
        if not all((got := leaves(p)) and got[-1][1] == root for p in sidecars):
            return False
        return served_serial(public) == leaves(sidecars[0])[-1][0]

    try:
        wait_until(on_root, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(
            f"not every sidecar moved to root {root}: "
            + "; ".join(f"{p.args[-3]}: {leaves(p)}" for p in sidecars)
        ) from None


def test_renewal_rotation_and_a_switch_to_vault_and_back_fail_no_request(
    server, procs, apps, openbao, vault_paths
):
    t0 = time.monotonic()
    app = EchoApp(upper=True)
    apps.append(app)
    up = free_port()
    register(server.url, sidecar_service("db", app.port))
    register(server.url, sidecar_service("web", free_port(), [("db", up)]))
    sidecars = []
    for name in ("db", "web"):
        p = ProxyProcess(["-sidecar-for", name, "-http-addr", server.url]).start()
        procs.append(p)
        sidecars.append(p)

    def echoes() -> bool:
        with socket.create_connection(("127.0.0.1", up), timeout=5) as c:
            return exchange(c, b"hello") == b"HELLO"

    wait_until(echoes, timeout=15)
    first_root = active_root(server.url)
    first = {p.args[-3]: leaves(p) for p in sidecars}
    assert all(len(v) == 1 and v[0][1] == first_root for v in first.values()), first
    db_public = sidecars[0].listening["public"][1]
    assert served_serial(db_public) == first["db"][0][0]

    with Traffic(up) as traffic:
        traffic.flowing()

        # 1. Renewal: a 30 s leaf is renewed 18-27 s after it came, under the same root.
        def renewed() -> bool:
            return all(len(leaves(p)) >= 2 for p in sidecars)

        wait_until(renewed, timeout=40, interval=0.1)
        for p in sidecars:
            (s1, r1), (s2, r2) = leaves(p)[:2]
            assert s1 != s2 and r1 == r2 == first_root, leaves(p)
        wait_until(lambda: served_serial(db_public) == leaves(sidecars[0])[-1][0])
        traffic.flowing()

        # 2. Root rotation: a new key type means a new root, cross-signed by the old one.
        rotated = set_ca(
            server.url,
            {
                "Provider": "builtin",
                "Config": {"LeafCertTTL": LEAF_TTL, "PrivateKeyType": "ec", "PrivateKeyBits": 384},
            },
        )
        moved_to(sidecars, rotated)
        traffic.flowing()

        # 3. To Vault (OpenBao PKI), cross-signed by the built-in root...
        vault = set_ca(
            server.url,
            {
                "Provider": "vault",
                "Config": {
                    "LeafCertTTL": LEAF_TTL,
                    "Address": openbao.address,
                    "Token": openbao.token,
                    "RootPKIPath": vault_paths.root,
                    "IntermediatePKIPath": vault_paths.intermediate,
                },
            },
        )
        moved_to(sidecars, vault)
        traffic.flowing()

        # ...and back to the built-in CA, cross-signed by the Vault root.
        back = set_ca(server.url, {"Provider": "builtin", "Config": {"LeafCertTTL": LEAF_TTL}})
        assert back not in (first_root, rotated, vault)
        moved_to(sidecars, back)
        traffic.flowing()
    traffic.check()
    assert traffic.steady and all(traffic.steady)
    # The long-lived connection was opened before the first renewal and is still the one
    # answering: it crossed every change.
    assert len(traffic.fresh) > 100 and len(traffic.steady) > 100
    assert time.monotonic() - t0 < 90
