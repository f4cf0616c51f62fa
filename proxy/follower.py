"""The follower: one service's view of the control plane, kept current by blocking queries.

Used by the sidecar (``trellis connect proxy``), and built to serve the node agent and the
native SDK the same way: whoever runs a follower gets ``Snapshot`` values (see
``trellis.proxy.snapshot``) through ``on_snapshot`` and never talks to the control plane on a
connection's path.

Theory of operation
-------------------
A follower has its service's P-256 key made once, in memory (never sent, logged or written),
by an injected ``keygen.KeySource``: in this process (the SDK, the tests), or in a short-lived
child process for ``trellis connect proxy``, which thus never imports ``cryptography`` (it
reads certificates with ``trellis.proxy.der``). The CSR is made with the key when the leaf is
first signed and again only when the identity changes (a new trust domain); a renewal sends
the same CSR. The follower runs one trio task per thing it follows, each a loop of blocking
queries over the typed client (``trellis.proxy.client``, run in a worker thread, since it is
synchronous):

* ``roots``: ``/v1/connect/ca/roots``;
* ``leaf``: signs a CSR through ``/v1/connect/ca/sign`` when there is no leaf, at the renewal
  point the pure policy chose (``trellis.proxy.renewal``), and within 30 s after the active
  root changed (or after a leaf came back signed under a root that is no longer active);
* ``intentions``: ``/v1/connect/intentions/match?by=destination`` for its service, and the
  default decision the server applies when no intention matches;
* ``config`` (sidecars only): the proxy's registration, via ``/v1/agent/services``, so that an
  upstream added or removed applies without a restart;
* one task per upstream: ``/v1/health/connect/<name>?passing``, the healthy instances.

Each task writes its piece into ``self._state`` and calls ``_publish``, which assembles a new
snapshot (rebuilding the TLS contexts only when the leaf or the roots changed) and hands it to
``on_snapshot``. Everything runs in one trio thread, so a snapshot is always consistent.

Failures: a query that fails because the control plane is unreachable or answers 5xx is
retried with capped, jittered backoff; the follower says once that it lost the control plane
and once that it is back, and keeps its last snapshot meanwhile (fail static). A 403 means the
token may not act as this service: that is fatal (``FollowerError``), as is a registration
that cannot be served.
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from trellis.proxy import authz, der, keygen, renewal, spiffe, tls
from trellis.proxy import client as api
from trellis.proxy import config as pconfig
from trellis.proxy.snapshot import Endpoint, Leaf, Roots, Snapshot

log = logging.getLogger("trellis.proxy.follower")

#: How long one blocking query waits on the server (the client adds its margin).
WAIT = 60.0
BACKOFF_MIN = 0.2
BACKOFF_MAX = 15.0
#: Header the server sets on /v1/connect/intentions/match: what it decides with no match.
DEFAULT_HEADER = "x-trellis-intention-default"

#: Per task: its last query failed, so its next one reads now instead of blocking on an index
#: (a restarted or restored server may have a lower index: blocking on the old one would wait
#: a whole ``WAIT`` before the follower saw what changed while it was away).
_after_failure: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "trellis_follower_after_failure", default=False
)


class FollowerError(Exception):
    """The follower cannot go on: the token may not act as the service, or the registration
    it follows cannot be served. The operator is at fault; the message says what to fix."""


@dataclass
class TLSMaterial:
    """What is built from the leaf and the roots: never printed (it holds the key)."""

    key_pem: str = field(repr=False)
    server: Any = field(repr=False)
    client: Any = field(repr=False)
    peers: tls.PeerCache = field(repr=False)


@dataclass
class _State:
    config: pconfig.ProxyConfig | None = None
    roots: Roots | None = None
    leaf: Leaf | None = None
    intentions: authz.IntentionSet | None = None
    default_allow: bool = False
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)


def _hex(b: bytes) -> str:
    return b.hex()


def roots_from_json(doc: dict[str, Any], index: int) -> Roots:
    """``/v1/connect/ca/roots`` as a ``Roots`` value (FollowerError if it is unusable;
    ``der.DERError`` if a certificate does not parse)."""
    td = doc.get("TrustDomain")
    if not isinstance(td, str) or not td:
        raise FollowerError("the CA has no trust domain yet")
    pems: list[str] = []
    key_ids: set[str] = set()
    for r in doc.get("Roots") or ():
        certs = [r.get("RootCert", ""), *(r.get("IntermediateCerts") or ())]
        for pem in certs:
            if not pem:
                continue
            for cert_der in der.pem_certificates(pem):
                ski = der.certificate(cert_der).extensions.get(der.OID_SUBJECT_KEY_IDENTIFIER)
                if ski is not None:
                    key_ids.add(_hex(der.subject_key_id(ski.value)))
        pems.append(r.get("RootCert", ""))
    if not pems:
        raise FollowerError("the CA lists no roots")
    return Roots(
        trust_domain=td,
        active_id=str(doc.get("ActiveRootID", "")),
        pems=tuple(pems),
        key_ids=frozenset(key_ids),
        index=index,
    )


def leaf_from_json(issued: dict[str, Any]) -> Leaf:
    """``/v1/connect/ca/sign``'s answer as a ``Leaf`` (``der.DERError`` if it does not
    parse)."""
    certs = der.pem_certificates(issued["CertPEM"])
    leaf = der.certificate(certs[0])
    if leaf.serial <= 0:
        raise der.DERError("the leaf's serial number is not positive")
    aki = leaf.extensions.get(der.OID_AUTHORITY_KEY_IDENTIFIER)
    issuer = der.authority_key_id(aki.value) if aki is not None else None
    return Leaf(
        cert_pem=der.pem(certs[0]),
        chain_pem=tuple(der.pem(c) for c in certs[1:]),
        not_before=leaf.not_before.timestamp(),
        not_after=leaf.not_after.timestamp(),
        serial=der.serial_hex(leaf.serial),
        issuer_key_id=_hex(issuer or b""),
    )


def endpoints_from_health(entries: list[dict[str, Any]]) -> tuple[Endpoint, ...]:
    """Healthy Connect instances from ``/v1/health/connect/<name>``: the proxy's (or the
    native app's) address, or its node's when the service has none."""
    out = []
    for e in entries:
        svc = e.get("Service") or {}
        node = e.get("Node") or {}
        address = svc.get("Address") or node.get("Address")
        port = svc.get("Port")
        if not address or not isinstance(port, int) or port <= 0:
            continue
        out.append(Endpoint(str(address), port, str(svc.get("ID", "")), str(node.get("Node", ""))))
    return tuple(out)


class Follower:
    """Follows the control plane for one service; see the module docstring.

    ``locate`` picks the proxy's configuration out of the local agent's services
    (``/v1/agent/services``) for a sidecar; a developer proxy passes a fixed ``config``.
    """

    def __init__(
        self,
        client: api.Client,
        *,
        service: str | None = None,
        config: pconfig.ProxyConfig | None = None,
        locate: Callable[[dict[str, Any]], pconfig.ProxyConfig] | None = None,
        on_snapshot: Callable[[Snapshot], None] = lambda s: None,
        rng: random.Random | None = None,
        wait: float = WAIT,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
        keys: keygen.KeySource | None = None,
    ) -> None:
        if (config is None) == (locate is None):
            raise ValueError("give either a fixed config or a locate function")
        self.client = client
        self.on_snapshot = on_snapshot
        self._locate = locate
        self._state = _State(config=config)
        self._service = service or (config.service if config else None)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._wait = wait
        self._backoff = backoff
        self._keys: keygen.KeySource = keys or keygen.InProcessKeys()
        self._key_pem: str | None = None
        self._csr: tuple[spiffe.ServiceID, str] | None = None
        self._tls: TLSMaterial | None = None
        self._tls_for: tuple[Any, Any] = (None, None)
        self._version = 0
        self.snapshot: Snapshot | None = None
        self.connected = True
        # Set (and replaced) when the control plane answers again after a loss: every task
        # waiting out its backoff retries at once, so the proxy catches up in one round.
        self._back = trio.Event()
        self._leaf_due = trio.Event()
        self._config_changed = trio.Event()
        self.datacenter = ""
        self.ready = trio.Event()
        #: Destinations followed beyond the registration's upstreams (``watch``: the SDK's
        #: ``connect``, which names its destination at call time).
        self._watched: set[tuple[str, str]] = set()
        self._watch_changed = trio.Event()

    # -- plumbing --------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One client call in a worker thread, with the connection state bookkeeping."""
        if _after_failure.get():
            for blocking in ("index", "hash"):
                if blocking in kw:
                    kw[blocking] = None
        try:
            result = await trio.to_thread.run_sync(lambda: fn(*args, **kw), abandon_on_cancel=True)
        except api.APIError as e:
            if e.status == 403:
                raise FollowerError(
                    f"the token may not act as service {self._service!r}: {e.message}"
                ) from None
            if e.status is None or e.status >= 500:
                self._lost(e.message)
            raise
        if not self.connected:
            self.connected = True
            log.warning("control plane reachable again at %s", self.client.address)
            self._back.set()
            self._back = trio.Event()
        return result

    def _lost(self, why: str) -> None:
        if self.connected:
            self.connected = False
            log.warning(
                "control plane unreachable (%s); serving with what this proxy holds, retrying",
                why,
            )

    async def _retrying(self, name: str, step: Callable[[], Any], *, once: bool = False) -> None:
        """Run ``step`` forever (or until it succeeds ``once``); on a transient failure wait
        (capped, jittered backoff) and try again."""
        low, high = self._backoff
        delay = low
        while True:
            try:
                await step()
                _after_failure.set(False)
                if once:
                    return
                delay = low
            except FollowerError:
                raise
            except (api.APIError, ValueError, KeyError, TypeError) as e:
                # 4xx other than 403: the server refused our query, or its answer made no
                # sense to us: say so, and retry slowly. Unreachable: _call said so once.
                if not isinstance(e, api.APIError) or (e.status is not None and e.status < 500):
                    log.warning("%s: %s", name, e)
                else:
                    log.debug("%s: %s", name, e)
                _after_failure.set(True)
                with trio.move_on_after(delay * (0.5 + self._rng.random())):
                    await self._back.wait()
                delay = min(delay * 2, high)

    # -- the tasks -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Follow until cancelled. FollowerError ends it (the caller reports it)."""
        await self._retrying("datacenter", self._datacenter, once=True)
        async with trio.open_nursery() as nursery:
            if self._locate is not None:
                nursery.start_soon(self._retrying, "config", self._config_step)
                await self._config_changed.wait()
            assert self._service is not None
            nursery.start_soon(self._retrying, "roots", self._roots_step)
            nursery.start_soon(self._retrying, "leaf", self._leaf_step)
            nursery.start_soon(self._retrying, "intentions", self._intentions_step)
            nursery.start_soon(self._upstreams, nursery)
            task_status.started()

    _config_hash: str | None = None

    async def _config_step(self) -> None:
        assert self._locate is not None
        r = await self._call(
            self.client.agent_services_blocking, hash=self._config_hash, wait=self._wait
        )
        services, self._config_hash = r
        try:
            config = self._locate(services)
        except pconfig.ConfigError as e:
            if self._state.config is None:
                raise FollowerError(str(e)) from None
            log.error("the proxy's registration changed and cannot be served: %s", e)
            return
        if config != self._state.config:
            if self._state.config is not None and config.service != self._state.config.service:
                raise FollowerError("the proxy's destination service changed; restart it")
            self._state.config = config
            self._service = config.service
            self._config_changed.set()
            self._config_changed = trio.Event()
            self._publish()

    _roots_index: int | None = None

    async def _roots_step(self) -> None:
        r = await self._call(self.client.ca_roots, index=self._roots_index, wait=self._wait)
        self._roots_index = r.index
        roots = roots_from_json(r.value, r.index or 0)
        old = self._state.roots
        if old is not None and roots.pems == old.pems and roots.active_id == old.active_id:
            return
        self._state.roots = roots
        if old is not None and old.active_id != roots.active_id:
            # A new active root: re-sign soon (jittered within 30 s, renewal policy), so
            # that leaves move to the new root before the old one is pruned.
            leaf = self._state.leaf
            life = None if leaf is None else leaf.not_after - self._leaf_start
            self._renew_at = min(
                self._renew_at, renewal.after_root_change(time.time(), self._rng, life)
            )
            self._leaf_due.set()
        self._publish()

    _renew_at: float = 0.0
    _leaf_start: float = 0.0

    async def _leaf_step(self) -> None:
        now = time.time()
        if self._state.leaf is None or now >= self._renew_at:
            while self._state.roots is None:
                await self._wait_published()
            await self._sign()
        wait = max(0.0, self._renew_at - time.time())
        with trio.move_on_after(wait):
            await self._leaf_due.wait()
        self._leaf_due = trio.Event()

    async def _sign(self) -> None:
        roots = self._state.roots
        assert roots is not None and self._service is not None
        dc = self.datacenter
        ident = spiffe.service_id(roots.trust_domain, dc, self._service)
        if self._csr is None or self._csr[0] != ident:
            try:
                made = await self._keys.key_and_csr(ident.uri, self._key_pem)
            except keygen.KeygenError as e:
                raise FollowerError(str(e)) from None
            self._key_pem = made.key_pem
            self._csr = (ident, made.csr_pem)
        issued = await self._call(self.client.ca_sign, self._csr[1])
        leaf = leaf_from_json(issued)
        self._state.leaf = leaf
        self._leaf_start = renewal.lifetime_start(leaf.not_before, leaf.not_after, time.time())
        self._renew_at = renewal.plan(self._leaf_start, leaf.not_after, self._rng)
        log.info(
            "leaf certificate %s for %s (root %s), valid until %s",
            leaf.serial,
            ident.uri,
            issued.get("RootID") or "unknown",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(leaf.not_after)),
        )
        root_id = issued.get("RootID")
        if root_id and roots.active_id and root_id != roots.active_id:
            # Signed under a root that is no longer the active one we know: the server
            # process that signed had not heard of the rotation yet (its signing path reads
            # cached CA state, a few milliseconds behind another process's write). Ask again
            # as after a root change, or the leaf would stay on the old root until its plan.
            life = leaf.not_after - self._leaf_start
            self._renew_at = min(
                self._renew_at, renewal.after_root_change(time.time(), self._rng, life)
            )
        self._publish()

    async def _datacenter(self) -> None:
        """This cluster's datacenter (``/v1/catalog/datacenters``, which needs no ACL): the
        leaf's identity names it."""
        self.datacenter = await self._call(self.client.datacenter)

    _intentions_index: int | None = None

    async def _intentions_step(self) -> None:
        assert self._service is not None
        r = await self._call(
            self.client.intention_match_with_default,
            "destination",
            self._service,
            index=self._intentions_index,
            wait=self._wait,
        )
        matched, default = r.value
        self._intentions_index = r.index
        records = matched.get(self._service) or []
        iset = authz.IntentionSet(
            authz.Intention(
                source=i["SourceName"],
                destination=i["DestinationName"],
                action=i["Action"],
                id=i.get("ID", ""),
                description=i.get("Description", ""),
            )
            for i in records
        )
        if (
            self._state.intentions is not None
            and list(iset) == list(self._state.intentions)
            and default == self._state.default_allow
        ):
            return
        self._state.intentions = iset
        self._state.default_allow = default
        self._publish()

    def watch(self, destination: str, datacenter: str = "") -> None:
        """Follow ``destination``'s healthy instances too (into ``snapshot.endpoints``), as
        if it were an upstream. Call it in the follower's trio thread; idempotent."""
        key = (destination, datacenter)
        if key not in self._watched:
            self._watched.add(key)
            # Not _config_changed: run() waits on that one for a sidecar's first registration.
            self._watch_changed.set()
            self._watch_changed = trio.Event()

    async def _upstreams(self, nursery: trio.Nursery) -> None:
        """One watch per upstream destination; restarted when the set changes."""
        running: dict[tuple[str, str], trio.CancelScope] = {}
        while True:
            cfg = self._state.config
            wanted = {(u.destination, u.datacenter) for u in (cfg.upstreams if cfg else ())}
            wanted |= self._watched
            for key in list(running):
                if key not in wanted:
                    running.pop(key).cancel()
                    self._state.endpoints.pop(key[0], None)
            for key in wanted - running.keys():
                scope = trio.CancelScope()
                running[key] = scope
                nursery.start_soon(self._watch_upstream, key[0], key[1], scope)
            config_changed, watch_changed = self._config_changed, self._watch_changed
            async with trio.open_nursery() as race:

                async def first(event: trio.Event) -> None:
                    await event.wait()
                    race.cancel_scope.cancel()

                race.start_soon(first, config_changed)
                race.start_soon(first, watch_changed)

    async def _watch_upstream(self, name: str, dc: str, scope: trio.CancelScope) -> None:
        index: list[int | None] = [None]

        async def step() -> None:
            r = await self._call(
                self.client.health_connect,
                name,
                passing=True,
                datacenter=dc or None,
                index=index[0],
                wait=self._wait,
            )
            index[0] = r.index
            eps = endpoints_from_health(r.value)
            if self._state.endpoints.get(name) != eps:
                self._state.endpoints[name] = eps
                self._publish()

        with scope:
            await self._retrying(f"upstream {name}", step)

    # -- snapshots -------------------------------------------------------------------------

    _published: trio.Event | None = None

    async def _wait_published(self) -> None:
        if self._published is None:
            self._published = trio.Event()
        await self._published.wait()

    def _publish(self) -> None:
        st = self._state
        if st.config is None or st.roots is None or self._service is None:
            self._signal()
            return
        if st.leaf is not None and (st.leaf, st.roots) != self._tls_for:
            assert self._key_pem is not None  # made before the leaf was signed
            try:
                kwargs: dict[str, Any] = dict(
                    cert_pem=st.leaf.cert_pem,
                    chain_pem=st.leaf.chain_pem,
                    key_pem=self._key_pem,
                    roots_pem=st.roots.pems,
                )
                self._tls = TLSMaterial(
                    key_pem=self._key_pem,
                    server=tls.server_context(**kwargs),
                    client=tls.client_context(**kwargs),
                    peers=tls.PeerCache(),
                )
                self._tls_for = (st.leaf, st.roots)
            except tls.TLSConfigError as e:
                log.error("cannot use the new certificate material: %s", e)
        dc = self.datacenter
        self._version += 1
        snap = Snapshot(
            identity=spiffe.service_id(st.roots.trust_domain, dc, self._service),
            config=st.config,
            leaf=st.leaf if self._tls is not None else None,
            roots=st.roots,
            intentions=st.intentions,
            default_allow=st.default_allow,
            endpoints=dict(st.endpoints),
            version=self._version,
            tls=self._tls,
        )
        self.snapshot = snap
        if snap.ready_to_dial and (snap.intentions is not None or snap.config.public is None):
            self.ready.set()
        self._signal()
        self.on_snapshot(snap)

    def _signal(self) -> None:
        if self._published is not None:
            self._published.set()
            self._published = None


def with_config(snap: Snapshot, config: pconfig.ProxyConfig) -> Snapshot:
    return replace(snap, config=config)
