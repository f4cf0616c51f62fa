"""The proxy's own leaf over time, in this process against a small control plane (the
injected object of tests/test_proxy_follower.py) and real loopback sockets: a short leaf is
renewed on the plan, not at once and again; and a proxy whose leaf has expired, with the
control plane gone so that it cannot renew, refuses new connections and says why."""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import time
from typing import Any

import trio

from tests.proxy_support import EchoApp
from tests.support import wait_until
from trellis.proxy import tls
from trellis.proxy import x509 as px
from trellis.proxy.config import ProxyConfig, Upstream
from trellis.proxy.follower import Follower
from trellis.proxy.sidecar import Sidecar

from .mesh_support import MeshCA
from .test_proxy_follower import ControlPlane

ROOT_IN_LOG = re.compile(r"leaf certificate \S+ for \S+ \(root (\S+)\)")


class ShortLeaves(ControlPlane):
    """Signs leaves of ``ttl`` seconds, backdated as the built-in CA backdates them."""

    def __init__(self, ca: MeshCA, ttl: float) -> None:
        super().__init__(ca)
        self.ttl = ttl
        self.signed: list[float] = []  # when each CSR was signed

    def ca_sign(self, csr_pem: str) -> dict[str, Any]:
        self._answer("sign", None, None)
        self.signed.append(time.monotonic())
        info = px.check_csr(px.load_csr(csr_pem), trust_domain=self.ca.trust_domain)
        cert = px.build_leaf(
            info, issuer=self.ca.root, issuer_key=self.ca.key, ttl=dt.timedelta(seconds=self.ttl)
        )
        return {"CertPEM": px.cert_pem(cert), "RootID": "root-0"}


class Earliest:
    """Jitter at its lowest: the plan is 60% of the lifetime, a root change renews at once."""

    def random(self) -> float:
        return 0.0

    def uniform(self, a: float, b: float) -> float:
        return a


def test_a_short_leaf_is_renewed_on_its_plan_not_at_once_and_again():
    # A 20 s leaf backdated by a minute "lives" 80 s; 60% of that from its notBefore is 12 s
    # before it was signed. Planned from notBefore, the follower re-signed at once, got
    # another such leaf, and re-signed again: 582 CSRs in 2 s before the fix. Planned from
    # when it arrived, the renewal comes 12 s later.
    cp = ShortLeaves(MeshCA(), ttl=20)
    config = ProxyConfig(service="web")

    async def main() -> None:
        f = Follower(cp, config=config, wait=5, rng=Earliest())  # type: ignore[arg-type]
        async with trio.open_nursery() as n:
            await n.start(f.run)
            with trio.fail_after(5):
                while f.snapshot is None or f.snapshot.leaf is None:
                    await trio.sleep(0.01)
            await trio.sleep(2)
            n.cancel_scope.cancel()

    trio.run(main)
    assert len(cp.signed) == 1, f"{len(cp.signed)} CSRs signed in 2 s"


def _closed_at_once(port: int) -> bool:
    """A connection to ``port`` is closed by the proxy before it says anything (a listener
    that took it would wait for our TLS ClientHello, or for our bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.settimeout(3)
        try:
            return c.recv(10) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def test_past_its_leaf_expiry_with_no_control_plane_the_proxy_refuses_new_connections(caplog):
    caplog.set_level(logging.INFO, logger="trellis.proxy")
    ca = MeshCA()
    cp = ShortLeaves(ca, ttl=3)
    cp.default_allow = True
    app = EchoApp()
    # The upstream's one instance is a plain listener that counts what reaches it.
    instance = socket.socket()
    instance.bind(("127.0.0.1", 0))
    instance.listen(16)
    instance.settimeout(0.2)
    where = {"ID": "cache-1", "Address": "127.0.0.1", "Port": instance.getsockname()[1]}
    cp.instances = [{"Service": where, "Node": {"Node": "n1"}}]
    config = ProxyConfig(
        service="db",
        public=("127.0.0.1", 0),
        local_app=("127.0.0.1", app.port),
        upstreams=(Upstream("cache", 0),),
    )
    peer = ca.leaf("web")
    # A mesh peer's client context (it checks no server identity: the proxy admitting it is
    # what is tested).
    peer_ctx = tls.client_context(
        cert_pem=peer.cert_pem, chain_pem=(), key_pem=peer.key_pem, roots_pem=(ca.root_pem,)
    )

    def body(sidecar: Sidecar) -> None:
        public = sidecar.bound["public"][1]
        upstream = sidecar.bound["upstream 127.0.0.1:0"][1]
        # Serving while the leaf is good: a mesh peer's bytes reach the app.
        with socket.create_connection(("127.0.0.1", public), timeout=5) as raw:
            with peer_ctx.wrap_socket(raw) as t:
                t.sendall(b"ping")
                assert t.recv(10) == b"ping"
        cp.go_down()
        snap = wait_until(lambda: sidecar.snapshot, timeout=5)
        wait_until(lambda: not sidecar.follower.connected, timeout=10)
        leaf = sidecar.snapshot.leaf
        wait_until(lambda: time.time() > leaf.not_after + 0.1, timeout=10, interval=0.05)
        assert sidecar.snapshot.leaf == leaf  # no renewal reached it: the CA is gone
        assert snap.expired(time.time())
        # Refused before any handshake, on the public listener and on the upstream listener.
        assert _closed_at_once(public)
        assert _closed_at_once(upstream)
        try:
            instance.accept()[0].close()
            reached = True
        except TimeoutError:
            reached = False
        assert not reached  # the upstream's instance was not even dialled

    async def main() -> None:
        f = Follower(cp, config=config, wait=5, backoff=(0.2, 0.5))  # type: ignore[arg-type]
        sidecar = Sidecar(f)
        async with trio.open_nursery() as n:
            await n.start(sidecar.run)
            await trio.to_thread.run_sync(body, sidecar)
            sidecar.stop()

    try:
        trio.run(main)
    finally:
        app.close()
        instance.close()
    said = [r.getMessage() for r in caplog.records if "has expired" in r.getMessage()]
    assert said == [
        "this proxy's certificate has expired and cannot be renewed (the control plane is"
        " unreachable): refusing new connections"
    ]


class LateToTheRotation(ShortLeaves):
    """A server process that signs the first CSR after a rotation with the root it had
    before (it hears of another process's rotation a few milliseconds late: the CA's
    signing path reads its cached state), then with the active one."""

    def ca_sign(self, csr_pem: str) -> dict[str, Any]:
        issued = super().ca_sign(csr_pem)
        return {**issued, "RootID": "root-old" if len(self.signed) == 1 else "root-0"}


def test_a_leaf_signed_under_a_root_that_is_no_longer_active_is_signed_again_soon(caplog):
    # Before the fix the follower kept it until its planned renewal (36-54 min into a 1h
    # leaf, 43-65 h into a 72h one), while its roots said another root was active.
    caplog.set_level(logging.INFO, logger="trellis.proxy")
    cp = LateToTheRotation(MeshCA(), ttl=3600)

    async def main() -> None:
        f = Follower(cp, config=ProxyConfig(service="web"), wait=5, rng=Earliest())  # type: ignore[arg-type]
        async with trio.open_nursery() as n:
            await n.start(f.run)
            # Until the second leaf is in use (logged once the follower took it), not merely
            # asked for: the first leaf is in the snapshot while the second is being signed.
            with trio.fail_after(5):
                while len(logged_roots()) < 2:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()

    def logged_roots() -> list[str]:
        return [m.group(1) for r in caplog.records if (m := ROOT_IN_LOG.search(r.getMessage()))]

    trio.run(main)
    assert logged_roots() == ["root-old", "root-0"]
