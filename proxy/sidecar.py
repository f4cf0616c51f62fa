"""The sidecar: listeners, admission and the connection table, over the follower's snapshots.

``trellis connect proxy`` runs one ``Sidecar``. It owns a ``Reactor`` (the byte path), a
``Follower`` (the control plane) and the decisions between them:

* **Public listener** (a sidecar, or a developer proxy with ``-listen``): TLS, client
  certificate required and verified by OpenSSL against this trust domain's roots; then the
  peer's leaf profile and its one SPIFFE ID (``trellis.proxy.tls``), then the intention
  decision of the current snapshot (``Snapshot.decide``). Only then is the local app dialled:
  no byte reaches it before all three pass. A refusal closes the connection and is logged
  once, with the peer's identity and the decision's reason.
* **Upstream listeners**: each local connection goes to a healthy instance (round-robin over
  the snapshot, the next one when a connect or handshake fails, within the upstream's connect
  timeout), and the server must be exactly the destination's SPIFFE ID. No healthy instance:
  the local connection is closed at once, with the reason in the log.
* **Live changes**: every snapshot is applied as a whole. New contexts serve new connections
  (listeners are never restarted for a renewed leaf or new roots); upstream listeners follow
  the registration; and the connection table re-decides every open inbound connection, so a
  source that an intention now denies loses its connections at once, as does a peer whose
  root has left the trust bundle.
* **Fail static**: with the control plane gone, the last snapshot keeps serving; past the
  leaf's expiry, new connections are refused (and that is said once). On a cold start, nothing
  listens until the first complete snapshot.
* **Stopping** (``stop``): listeners close, open connections get ``drain`` seconds to finish,
  then are closed.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from trellis.proxy import config as pconfig
from trellis.proxy import reactor as rx
from trellis.proxy.follower import Follower
from trellis.proxy.snapshot import ConnTable, PeerVerdict, Snapshot

log = logging.getLogger("trellis.proxy")

#: How often deadlines (handshake, connect, idle) are checked.
SWEEP = 0.25


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 3600.0
    max_connections: int = 8192
    drain: float = 10.0


class StartError(Exception):
    """The proxy cannot start as configured (a port in use, a bad address): one line for the
    operator."""


@dataclass
class _RateLimitedLog:
    """One line per (key) per ``every`` seconds, with how many were folded into it."""

    every: float = 10.0
    _last: dict[Any, tuple[float, int]] = field(default_factory=dict)

    def __call__(self, level: int, key: Any, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return
        folded = last[1] if last else 0
        if len(self._last) > 10000:
            self._last.clear()
        self._last[key] = (now, 0)
        if folded:
            msg += " (and %d more like it)"
            args = (*args, folded)
        log.log(level, msg, *args)


class Sidecar:
    def __init__(
        self,
        follower: Follower,
        limits: Limits = Limits(),
        *,
        reactor: rx.Reactor | None = None,
        hosted: bool = False,
    ) -> None:
        """``hosted``: the reactor hosts trio (``Reactor.host``) and runs its own loop and
        sweeps; otherwise ``run`` drives it as a trio task (``Reactor.run``)."""
        self.follower = follower
        follower.on_snapshot = self._on_snapshot
        self.limits = limits
        self.reactor = reactor or rx.Reactor()
        self.hosted = hosted
        self.table = ConnTable()
        self.snapshot: Snapshot | None = None
        self.decisions: dict[tuple[str, str], int] = {}
        self._public: rx.Listener | None = None
        self._public_addr: tuple[str, int] | None = None
        self._upstreams: dict[tuple[str, int], tuple[pconfig.Upstream, rx.Listener]] = {}
        self._rr: dict[str, int] = {}
        self._serving = False
        self._stopping = trio.Event()
        self._log = _RateLimitedLog()
        self._expired_said = False
        self.bound: dict[str, tuple[str, int]] = {}  # what listens where (for tests, banner)

    # -- running ---------------------------------------------------------------------------

    async def run(
        self,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
        on_waiting: Callable[[str], None] | None = None,
    ) -> None:
        """Serve until ``stop``; FollowerError or StartError end it (the caller reports)."""
        async with trio.open_nursery() as nursery:
            if not self.hosted:
                nursery.start_soon(self.reactor.run)
                nursery.start_soon(self._sweep)
            nursery.start_soon(self.follower.run)
            with trio.move_on_after(5):
                await self.follower.ready.wait()
            if not self.follower.ready.is_set():
                why = (
                    "the control plane is unreachable"
                    if not self.follower.connected
                    else "waiting for a certificate, roots and intentions"
                )
                (on_waiting or log.warning)(f"listening on nothing yet: {why}")
                await self.follower.ready.wait()
            snap = self.follower.snapshot
            assert snap is not None
            self._serving = True
            self._apply(snap, None, starting=True)
            task_status.started(self)
            await self._stopping.wait()
            await self._drain()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._stopping.set()

    async def _drain(self) -> None:
        self._close_listeners()
        deadline = trio.current_time() + self.limits.drain
        while self.reactor.connections and trio.current_time() < deadline:
            await trio.sleep(0.05)
        if self.reactor.connections:
            log.info(
                "closing %d connections still open after the drain", len(self.reactor.connections)
            )
        self.reactor.close()

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP)
            self.reactor.sweep(time.monotonic())

    # -- snapshots -------------------------------------------------------------------------

    def _on_snapshot(self, snap: Snapshot) -> None:
        old, self.snapshot = self.snapshot, snap
        if self._serving:
            self._apply(snap, old)

    def _apply(self, snap: Snapshot, old: Snapshot | None, *, starting: bool = False) -> None:
        self.snapshot = snap
        try:
            self._listen(snap, starting=starting)
        except StartError:
            if starting:
                raise
        if old is None:
            return
        if old.intentions is not snap.intentions or old.default_allow != snap.default_allow:
            for conn_id, decision in self.table.redecide(snap.decide):
                conn = self.reactor.connections.get(conn_id)
                if conn is not None:
                    log.info("conn %d: closed, %s", conn_id, decision.reason)
                    conn.close(f"no longer allowed: {decision.reason}")
        if snap.roots is not None and (old.roots is None or old.roots.pems != snap.roots.pems):
            for conn_id in self.table.untrusted(snap.roots.key_ids):
                conn = self.reactor.connections.get(conn_id)
                if conn is not None:
                    conn.close("the peer's root is no longer trusted")

    def _bind(self, what: str, address: tuple[str, int]) -> socket.socket:
        try:
            return rx.bind(*address)
        except OSError as e:
            raise StartError(f"{what}: {e.strerror}") from None

    def _listen(self, snap: Snapshot, *, starting: bool) -> None:
        cfg = snap.config
        # The public listener.
        if cfg.public != self._public_addr:
            if self._public is not None:
                self._public.close()
                self._public = None
                self.bound.pop("public", None)
            self._public_addr = None
            if cfg.public is not None:
                try:
                    sock = self._bind("public listener", cfg.public)
                except StartError as e:
                    log.error("%s", e)
                    raise
                self._public = rx.Listener(self.reactor, sock, self._accept_public)
                self._public_addr = cfg.public
                self.bound["public"] = sock.getsockname()[:2]
        # Upstream listeners, by where they listen.
        wanted = {u.listen: u for u in cfg.upstreams}
        for where in list(self._upstreams):
            if where not in wanted:
                self._upstreams.pop(where)[1].close()
                self.bound.pop(f"upstream {where[0]}:{where[1]}", None)
        for where, up in wanted.items():
            have = self._upstreams.get(where)
            if have is not None:
                self._upstreams[where] = (up, have[1])
                continue
            sock = self._bind(f"upstream {up.destination}", where)
            listener = rx.Listener(
                self.reactor, sock, lambda s, a, where=where: self._accept_upstream(where, s)
            )
            self._upstreams[where] = (up, listener)
            self.bound[f"upstream {where[0]}:{where[1]}"] = sock.getsockname()[:2]

    def _close_listeners(self) -> None:
        if self._public is not None:
            self._public.close()
            self._public = None
        for _, listener in self._upstreams.values():
            listener.close()
        self._upstreams.clear()

    # -- accepting -------------------------------------------------------------------------

    def _refuse_new(self, snap: Snapshot | None, sock: socket.socket) -> bool:
        """Whether a new connection must be refused before anything else (closed at once)."""
        if snap is None or snap.tls is None:
            sock.close()
            return True
        if len(self.reactor.connections) >= self.limits.max_connections:
            self.reactor.counters.refused_over_limit += 1
            self._log(
                logging.WARNING,
                "limit",
                "refusing connections: %d open, the maximum",
                len(self.reactor.connections),
            )
            sock.close()
            return True
        if snap.expired(time.time()):
            if not self._expired_said:
                self._expired_said = True
                log.error(
                    "this proxy's certificate has expired and cannot be renewed (the control"
                    " plane is unreachable): refusing new connections"
                )
            sock.close()
            return True
        self._expired_said = False
        return False

    def _accept_public(self, sock: socket.socket, addr: Any) -> None:
        snap = self.snapshot
        if self._refuse_new(snap, sock):
            return
        assert snap is not None
        timeouts = rx.Timeouts(
            handshake=self.limits.handshake_timeout, idle=self.limits.idle_timeout
        )
        self.reactor.counters.opened["inbound"] += 1
        self.reactor.counters.open["inbound"] += 1
        rx.Inbound(
            self.reactor, sock, snap.tls.server, snap.tls.peers, self._admit, timeouts, self._ended
        )

    def _admit(self, conn: rx.Inbound, verdict: PeerVerdict) -> rx.Route:
        snap = self.snapshot
        assert snap is not None
        answer = snap.admit(verdict)
        peer = answer.source
        if peer is None:
            c = self.reactor.counters
            c.fail(c.handshake_failures, "identity")
            self._log(
                logging.WARNING,
                ("identity", answer.reason),
                "conn %d: refused: %s",
                conn.id,
                answer.reason,
            )
            return rx.Route(False, answer.reason)
        key = (peer.service, "allow" if answer.allowed else "deny")
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if not answer.allowed:
            self._log(
                logging.INFO,
                ("deny", peer.uri, answer.reason),
                "conn %d: refused %s: %s",
                conn.id,
                peer.uri,
                answer.reason,
            )
            return rx.Route(False, answer.reason)
        if snap.config.local_app is None:
            return rx.Route(False, "this proxy forwards to no local app")
        self.table.add(conn.id, peer, verdict.issuer_key_id)
        log.debug("conn %d: %s admitted (%s)", conn.id, peer.uri, answer.reason)
        return rx.Route(True, answer.reason, snap.config.local_app, peer)

    def _accept_upstream(self, where: tuple[str, int], sock: socket.socket) -> None:
        snap = self.snapshot
        entry = self._upstreams.get(where)
        if entry is None or self._refuse_new(snap, sock):
            if entry is None:
                sock.close()
            return
        assert snap is not None
        up = entry[0]
        eps = snap.endpoints.get(up.destination, ())
        if not eps:
            c = self.reactor.counters
            c.fail(c.upstream_connect_failures, "no_healthy_instance")
            self._log(
                logging.WARNING,
                ("none", up.destination),
                "upstream %s: no healthy instance; closing the local connection",
                up.destination,
            )
            sock.close()
            return
        start = self._rr.get(up.destination, 0) % len(eps)
        self._rr[up.destination] = start + 1
        candidates = [e.target for e in eps[start:] + eps[:start]]

        def expect(verdict: PeerVerdict, up: pconfig.Upstream = up) -> str | None:
            return snap.check_upstream(verdict, up.destination, up.datacenter)

        self.reactor.counters.opened["outbound"] += 1
        self.reactor.counters.open["outbound"] += 1
        rx.Outbound(
            self.reactor,
            sock,
            snap.tls.client,
            snap.tls.peers,
            candidates,
            expect,
            rx.Timeouts(connect=up.connect_timeout, idle=self.limits.idle_timeout),
            self._ended,
            label=up.destination,
        )

    def _ended(self, conn: rx.Connection, reason: str) -> None:
        self.reactor.counters.open[conn.direction] -= 1
        if conn.direction == "inbound":
            self.table.remove(conn.id)
        if reason not in ("closed", "proxy stopped"):
            log.debug("conn %d (%s): %s", conn.id, conn.direction, reason)
        if isinstance(conn, rx.Outbound) and reason.startswith(("no instance", "timed out")):
            self._log(
                logging.WARNING, ("upstream", conn.label), "upstream %s: %s", conn.label, reason
            )
