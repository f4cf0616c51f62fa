"""The follower against a small control plane in this process (an injected object with the
typed client's methods, answering in the client's worker threads as the server would): what it
publishes, and how it rides out an outage and catches up when the server is back."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
import trio

from trellis.proxy import client as api
from trellis.proxy import spiffe
from trellis.proxy import x509 as px
from trellis.proxy.config import ProxyConfig, Upstream
from trellis.proxy.follower import Follower, FollowerError

from .mesh_support import DC, MeshCA


class ControlPlane:
    """Blocking queries with Consul's rule (wait while the index is not past the caller's),
    an outage switch, and a restart that comes back with a lower index."""

    def __init__(self, ca: MeshCA) -> None:
        self.ca = ca
        self.cond = threading.Condition()
        self.index = 10
        self.down = False
        self.refuse = False  # answers 403, as the server does to a token without service:write
        self.intentions: list[dict[str, Any]] = []
        self.default_allow = False
        self.instances: list[dict[str, Any]] = []
        self.calls: list[tuple[float, str, bool]] = []  # (when, method, answered)
        self.address = "http://control-plane.test"

    # -- the test's levers -----------------------------------------------------------------

    def change(self, **fields: Any) -> None:
        with self.cond:
            for k, v in fields.items():
                setattr(self, k, v)
            self.index += 1
            self.cond.notify_all()

    def restart(self, *, index: int, **fields: Any) -> None:
        """Back from an outage with ``fields`` changed meanwhile and the index at ``index``
        (a server restored from an older snapshot, or a fresh dev server)."""
        with self.cond:
            for k, v in fields.items():
                setattr(self, k, v)
            self.index = index
            self.down = False

    def go_down(self) -> None:
        with self.cond:
            self.down = True
            self.cond.notify_all()

    # -- what the follower calls -----------------------------------------------------------

    def _answer(self, method: str, index: int | None, wait: float | None) -> int:
        with self.cond:
            if index is not None and not self.down:
                self.cond.wait_for(lambda: self.down or self.index > index, timeout=wait)
            answered = not self.down and not self.refuse
            self.calls.append((time.monotonic(), method, answered))
            if self.down:
                raise api.APIError(None, "connection refused")
            if self.refuse:
                raise api.APIError(403, "Permission denied")
            return self.index

    def datacenter(self) -> str:
        self._answer("datacenter", None, None)
        return DC

    def ca_roots(self, *, index: int | None = None, wait: float | None = None) -> api.Indexed:
        return api.Indexed(self.ca.roots_json(), self._answer("roots", index, wait))

    def ca_sign(self, csr_pem: str) -> dict[str, Any]:
        self._answer("sign", None, None)
        info = px.check_csr(px.load_csr(csr_pem), trust_domain=self.ca.trust_domain)
        cert = px.build_leaf(
            info, issuer=self.ca.root, issuer_key=self.ca.key, ttl=dt.timedelta(hours=1)
        )
        return {"CertPEM": px.cert_pem(cert)}

    def intention_match_with_default(
        self, by: str, name: str, *, index: int | None = None, wait: float | None = None
    ) -> api.Indexed:
        i = self._answer("intentions", index, wait)
        return api.Indexed(({name: list(self.intentions)}, self.default_allow), i)

    def health_connect(
        self,
        name: str,
        passing: bool = False,
        *,
        datacenter: str | None = None,
        index: int | None = None,
        wait: float | None = None,
    ) -> api.Indexed:
        return api.Indexed(list(self.instances), self._answer("health", index, wait))


def _intention(source: str, action: str) -> dict[str, Any]:
    return {"SourceName": source, "DestinationName": "db", "Action": action, "ID": source}


CONFIG = ProxyConfig(
    service="db",
    public=("127.0.0.1", 21000),
    local_app=("127.0.0.1", 5432),
    upstreams=(Upstream("cache", 9191),),
)


async def _until(predicate: Any, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def _serving(f: Follower) -> bool:
    """It has a leaf, roots, intentions, and the upstream's instances."""
    snap = f.snapshot
    return snap is not None and snap.ready_to_serve and "cache" in snap.endpoints


@pytest.fixture
def ca() -> MeshCA:
    return MeshCA()


def test_it_publishes_leaf_roots_intentions_and_upstreams_then_follows_changes(ca):
    cp = ControlPlane(ca)
    cp.intentions = [_intention("web", "allow")]
    cp.instances = [{"Service": {"ID": "cache-1", "Address": "10.0.0.7", "Port": 21001},
                     "Node": {"Node": "n1", "Address": "10.0.0.1"}}]  # fmt: skip
    snaps: list[Any] = []

    async def main() -> None:
        f = Follower(cp, config=CONFIG, on_snapshot=snaps.append, wait=5)  # type: ignore[arg-type]
        async with trio.open_nursery() as n:
            await n.start(f.run)
            await _until(lambda: _serving(f), 5)
            snap = f.snapshot
            assert snap is not None and snap.leaf is not None
            assert snap.identity == spiffe.service_id(ca.trust_domain, DC, "db")
            assert snap.decide(spiffe.service_id(ca.trust_domain, DC, "web")).allowed
            assert not snap.decide(spiffe.service_id(ca.trust_domain, DC, "api")).allowed
            assert [e.port for e in snap.endpoints["cache"]] == [21001]
            # A deny replaces the allow: the next snapshot refuses web; nothing else moved.
            cp.change(intentions=[_intention("web", "deny")])
            await _until(
                lambda: (
                    not f.snapshot.decide(  # type: ignore[union-attr]
                        spiffe.service_id(ca.trust_domain, DC, "web")
                    ).allowed
                ),
                5,
            )
            assert f.snapshot.leaf == snap.leaf  # type: ignore[union-attr]
            n.cancel_scope.cancel()

    trio.run(main)
    versions = [s.version for s in snaps]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


class SpreadJitter:
    """Jitter that spreads the watches' retries 2.5 s apart (a backoff of 5 s times 0.5, 1.0,
    1.5 in turn), so that only a wake-up can bring them back together."""

    def __init__(self) -> None:
        self.n = 0

    def random(self) -> float:
        self.n += 1
        return (self.n % 3) / 2


def test_after_an_outage_every_watch_catches_up_as_soon_as_one_gets_through(ca):
    # When the first query after the outage succeeds, the other watches stop waiting out
    # their backoff; and since the server came back with a lower index, they read at once
    # rather than block on the old index (which, with a 30 s wait, would hide the new deny
    # for 30 s).
    cp = ControlPlane(ca)
    cp.intentions = [_intention("web", "allow")]
    web = spiffe.service_id(ca.trust_domain, DC, "web")

    async def main() -> None:
        f = Follower(
            cp,  # type: ignore[arg-type]
            config=CONFIG,
            wait=30,
            backoff=(5.0, 5.0),
            rng=SpreadJitter(),  # type: ignore[arg-type]
        )
        async with trio.open_nursery() as n:
            await n.start(f.run)
            await _until(lambda: _serving(f), 5)
            cp.go_down()
            await _until(lambda: not f.connected, 5)
            await trio.sleep(0.5)
            assert f.snapshot.decide(web).allowed  # type: ignore[union-attr]  # fail static
            restored = time.monotonic()
            cp.restart(index=3, intentions=[_intention("web", "deny")])
            await _until(lambda: f.connected, 10)
            back = min(t for t, _, ok in cp.calls if ok and t >= restored)
            await _until(lambda: not f.snapshot.decide(web).allowed, 10)  # type: ignore[union-attr]
            assert time.monotonic() - back < 1.0
            for watch in ("roots", "intentions", "health"):
                answered = [t for t, m, ok in cp.calls if ok and m == watch and t >= restored]
                assert answered and answered[0] - back < 1.0, watch
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_token_that_may_not_act_as_the_service_ends_the_follower(ca):
    cp = ControlPlane(ca)
    cp.refuse = True

    async def main() -> None:
        f = Follower(cp, config=CONFIG, wait=5)  # type: ignore[arg-type]
        await f.run()

    with pytest.raises(FollowerError, match="may not act as service 'db'"):
        trio.run(main)
