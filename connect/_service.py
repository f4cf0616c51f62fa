"""``Service``: one mesh identity in this process, kept current by the follower.

Theory of operation
-------------------
The engine is ``trellis.proxy.follower.Follower``, the one every sidecar runs: blocking
queries for the roots, the leaf (signed from a CSR whose key never leaves this process), the
intentions naming this service and the healthy instances of each destination it calls. Each
change becomes a new immutable ``Snapshot`` with its SSL contexts built once; the follower
hands it to ``_state.Current``, from which the app's threads read with no network call and no
lock on the connection path. The SDK makes no decision of its own: intentions are decided by
``Snapshot.admit`` (``trellis.proxy.authz``), the upstream identity by
``Snapshot.check_upstream``, as in the sidecar.

Where the follower runs:

* ``Service(...)`` starts a daemon thread with its own ``trio.run``, for sync and asyncio
  code; ``close()`` cancels it (through the trio token) and joins it;
* ``open_service(...)`` runs it as a task of the caller's trio run, in a nursery the context
  manager opens and cancels on exit.

The key is made in a short-lived child process (``keygen.ChildKeys``), as the sidecar does: a
key is made once per identity, and the app never imports ``cryptography`` for it (some 9 MB of
resident memory per process, which a pre-forking server pays per worker).

Forks: a ``Service`` belongs to the process that made it. ``fork()`` copies the object but
not its follower thread, so in the child nothing would renew the leaf, follow the roots or the
intentions: a pre-forking server's worker would serve a frozen identity until it expired, and
allow what was since denied. Such a copy fails instead, at once and with the recipe (make one
per worker, after the fork): every call raises ``ConnectError``, and its
``server_ssl_context`` refuses handshakes. It does not restart itself in the child: a lock or
an HTTP connection held by the follower at the moment of the fork stays held, or shared with
the parent, in the child, so the only sound copy is a new ``Service``. The check is one
comparison of a counter that ``os.register_at_fork`` bumps in every child: nothing per call.

A destination is followed from the first call that names it (``Follower.watch``); that call
waits (within its timeout) for the first list of healthy instances, later calls do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from trellis.connect._state import ConnectError, Current, Peer, check_server
from trellis.connect._switch import switching_context
from trellis.proxy import authz, keygen, spiffe
from trellis.proxy import client as api
from trellis.proxy.config import ProxyConfig
from trellis.proxy.follower import Follower, FollowerError
from trellis.proxy.snapshot import Endpoint, Snapshot

if TYPE_CHECKING:
    from trellis.connect import _httpx

__all__ = ["ConnectError", "Service", "open_service"]

log = logging.getLogger("trellis.connect")

#: How long ``serve_connect`` waits for a client's handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Default for ``ready`` and for a call's wait for its destination's first instances.
DEFAULT_TIMEOUT = 30.0


def _serving(snap: Snapshot) -> bool:
    return snap.ready_to_serve and snap.tls is not None


#: Bumped in every child process at ``fork()``: a ``Service`` made at another value of it was
#: made in an ancestor process, and its follower thread did not come along.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

GREEN_THREADS = (
    "gevent's monkey-patching has made threads greenlets in this process: the follower (a "
    "thread running trio, which starts threads of its own) cannot run in it; serve with "
    "gunicorn's sync or gthread worker, or put a sidecar in front of a gevent app"
)


def check_real_threads() -> None:
    """ConnectError if gevent has monkey-patched ``threading`` in this process (gunicorn's
    gevent worker does, after its ``post_fork`` hook): trio's worker threads would then be
    greenlets of a hub that never runs, and the follower would stop at its next blocking
    call, silently serving an ageing leaf and stale intentions."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        raise ConnectError(GREEN_THREADS)


class Service:
    """One Connect service in this process: its identity, certificates and intentions.

    ``name`` is the service this process is (its leaf says ``.../svc/<name>``); ``address``
    the Trellis (or Consul-compatible) HTTP API, ``token`` an ACL token that may act as
    ``name`` (``service:write`` on it), ``ca_file`` the CA bundle of an ``https://`` address.

    Made with ``Service(...)``, it starts following at once in a background thread (for sync
    and asyncio code; trio code uses ``open_service``); use it as a context manager, or call
    ``close()``. Registering the service in the catalog (``Connect: {"Native": true}``) stays
    the operator's job, as for any Consul service. A pre-forking server makes one per worker,
    after the fork (gunicorn: ``trellis.connect.wsgi.WorkerService``): a thread does not
    survive it, and a ``Service`` used in a child of the process that made it raises
    ``ConnectError`` from every call (the programmer's mistake, said at the first use).

    ValueError if ``name`` is not a service name, ConnectError if ``address`` or ``ca_file``
    is unusable, or if gevent has monkey-patched threads in this process (the follower
    needs real ones): the caller's mistakes, said at once.
    """

    def __init__(
        self,
        name: str,
        *,
        address: str = api.DEFAULT_ADDRESS,
        token: str | None = None,
        ca_file: str | None = None,
        _start: bool = True,
    ) -> None:
        if authz.check_name(name) == authz.WILDCARD:
            raise ValueError("a service is named, not '*'")
        # Before anything is made; open_service's follower starts threads too
        # (trio.to_thread): the same rule.
        check_real_threads()
        self.name = name
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._current = Current()
        try:
            self._client = api.Client(address, token=token, verify=ca_file or True)
        except api.APIError as e:  # a malformed address, an unreadable CA file
            raise ConnectError(str(e)) from None
        self._follower = Follower(
            self._client,
            config=ProxyConfig(service=name),
            on_snapshot=self._current.publish,
            keys=keygen.ChildKeys(),
        )
        self._server_ctx: ssl.SSLContext | None = None
        self._fork_logged = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None
        #: Destinations the follower already follows: a call naming one skips the hop into the
        #: follower's thread (some 90 us under load, on every connection) and goes straight
        #: to the snapshot. Only ever added to, as the follower's own set is.
        self._watched: set[str] = set()
        if _start:
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._thread_main,
                args=(started,),
                name=f"trellis-connect-{name}",
                daemon=True,
            )
            self._thread.start()
            started.wait()

    # -- running the follower ------------------------------------------------------------

    def _thread_main(self, started: threading.Event) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._cancel = scope
                started.set()
                await self._follow()

        try:
            trio.run(main)
        except Exception as e:
            # A bug, not a state of the control plane: say it to ready() and connect(), which
            # would otherwise only learn that the service is closed.
            log.exception("%s: the follower stopped", self.name)
            self._current.fail(f"the follower stopped: {e!r}")
        finally:
            started.set()
            self._current.close()

    async def _follow(self) -> None:
        try:
            await self._follower.run()
        except* FollowerError as group:
            # Raised in one of the follower's tasks, so it comes wrapped in its nursery's group.
            self._current.fail(str(group.exceptions[0]))

    def _check_process(self) -> None:
        """ConnectError in a child process forked after this Service was made (see the
        module's theory of operation)."""
        if self._generation != _fork_generation:
            raise ConnectError(
                f"this Service ({self.name!r}) was made in process {self._pid}, before a fork: "
                "its follower did not survive the fork; make one per process after the fork "
                "(gunicorn: trellis.connect.wsgi.WorkerService's post_fork hook)"
            )

    def _serving_context(self) -> ssl.SSLContext | None:
        """What ``server_ssl_context`` serves a new handshake with: None (refuse) in a forked
        child, whose copy of the leaf and roots nothing keeps current."""
        if self._generation != _fork_generation:
            if not self._fork_logged:
                self._fork_logged = True
                log.error(
                    "%s: refusing TLS handshakes in process %d: this Service was made in "
                    "process %d before a fork; make one per worker after the fork",
                    self.name,
                    os.getpid(),
                    self._pid,
                )
            return None
        return self._current.server_context()

    def _in_run(self) -> bool:
        """Is the caller in the trio run that follows (``open_service``'s)?"""
        try:
            return trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def _watch(self, name: str) -> None:
        """Follow ``name``'s instances (from any thread but the follower's own)."""
        if self._token is None:
            raise self._current.down()
        if self._in_run():
            # The caller's bug: waiting here would block the very run that must answer.
            raise RuntimeError("from trio code, call connect_trio (this call would block)")
        if name in self._watched:
            return  # a closed or failed follower is said by the wait that follows
        try:
            trio.from_thread.run_sync(self._follower.watch, name, trio_token=self._token)
        except trio.RunFinishedError:
            # Ended by close(), or by a refusal that must still be the answer.
            raise self._current.down() from None
        self._watched.add(name)

    # -- lifecycle -------------------------------------------------------------------------

    def ready(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Wait until the service can serve and call: a leaf, the roots and its intentions.
        TimeoutError after ``timeout`` seconds (the control plane is slow or unreachable);
        ConnectError if the control plane refused this service (its token may not act as it:
        the operator's fault), it was closed, or it was made before a fork (see ``Service``)."""
        self._check_process()
        self._current.wait_for("leaf, roots and intentions", _serving, timeout)

    def close(self) -> None:
        """Stop following (idempotent). Open connections are left to their owners; new ones
        fail with ConnectError. In a child forked after this Service was made, nothing of it
        runs here: close() does nothing (the parent's follower is the parent's to stop)."""
        if self._generation != _fork_generation:
            return
        self._current.close()
        token, scope = self._token, self._cancel
        if token is not None and scope is not None:
            if self._in_run():
                scope.cancel()
            else:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(scope.cancel, trio_token=token)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._client.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server side -----------------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for any TLS server: it requires a client certificate from this
        trust domain's roots and presents this service's leaf, both as they are at each new
        handshake, so a renewed leaf or rotated roots need no restart. Before the first leaf
        (or past its expiry) handshakes are refused. The same object on every call.

        A verified client is not yet an allowed one: call ``authorize`` on the connection.
        ConnectError when called in a child forked after this Service was made; a context
        obtained before the fork refuses every handshake in the child (and logs why, once)."""
        self._check_process()
        if self._server_ctx is None:
            self._server_ctx = switching_context(self._serving_context)
        return self._server_ctx

    def authorize(self, peer: Peer) -> authz.Decision:
        """May ``peer`` reach this service? ``peer`` is a connection whose handshake finished
        (``ssl.SSLSocket``, ``ssl.SSLObject``), or its certificate chain as DER, leaf first
        (``bytes`` for the leaf alone, or a sequence), which is then verified in full against
        the current roots. Computed locally from the current intentions, by the same
        ``trellis.proxy.authz`` decision the sidecar makes; never raises for a bad peer: the
        ``Decision`` is a denial whose reason says what is wrong (the peer's fault). Before
        the intentions are known, every peer is denied. ConnectError (the programmer's
        mistake, not the peer's) when called in a child forked after this Service was made."""
        self._check_process()
        return self._current.authorize(peer)

    def _admit(self, peer: Peer) -> tuple[authz.Decision, spiffe.ServiceID | None]:
        """``authorize`` and the peer's verified identity, for the WSGI and ASGI adapters."""
        self._check_process()
        return self._current.admit(peer)

    # -- client side -----------------------------------------------------------------------

    def _instances(self, name: str, timeout: float | None) -> tuple[Snapshot, tuple[Endpoint, ...]]:
        self._check_process()
        if authz.check_name(name) == authz.WILDCARD:
            raise ValueError("a destination is a service, not '*'")
        self._watch(name)
        snap = self._current.wait_for(
            f"leaf and instances of {name!r}",
            lambda s: s.ready_to_dial and s.tls is not None and name in s.endpoints,
            timeout,
        )
        eps = self._current.endpoints(name)
        if not eps:
            raise ConnectError(f"{name}: no healthy instance")
        return snap, eps

    def connect(self, name: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> ssl.SSLSocket:
        """A mutual-TLS socket to a healthy instance of service ``name`` whose certificate is
        exactly ``name``'s SPIFFE ID in this trust domain and datacenter; the next instance
        is tried when one fails. ConnectError if none answers (with each one's reason),
        TimeoutError if the service has no leaf or ``name`` no instance list within
        ``timeout`` seconds; ValueError at once if ``name`` is not a service name or is ``*``
        (the caller's mistake)."""
        snap, eps = self._instances(name, timeout)
        errors = []
        for ep in eps:
            try:
                raw = socket.create_connection(ep.target, timeout=timeout)
            except OSError as e:
                errors.append(f"{ep.address}:{ep.port}: {e}")
                continue
            sock: ssl.SSLSocket | None = None
            try:
                sock = snap.tls.client.wrap_socket(raw)
                check_server(snap, sock, name)
            except (OSError, ConnectError) as e:
                # wrap_socket took raw's descriptor: the SSLSocket is what holds it now.
                (sock or raw).close()
                errors.append(f"{ep.address}:{ep.port}: {e}")
                continue
            sock.settimeout(None)
            return sock
        raise ConnectError(f"{name}: no instance answered: " + "; ".join(errors))

    async def connect_async(
        self, name: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``connect`` for asyncio: the ``(reader, writer)`` of ``asyncio.open_connection``,
        over mutual TLS to a verified instance of ``name``; same errors."""
        snap, eps = await asyncio.to_thread(self._instances, name, timeout)
        errors = []
        for ep in eps:
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(
                        ep.address, ep.port, ssl=snap.tls.client, server_hostname=""
                    )
            except (OSError, TimeoutError, ssl.SSLError) as e:
                errors.append(f"{ep.address}:{ep.port}: {e or type(e).__name__}")
                continue
            try:
                check_server(snap, writer.get_extra_info("ssl_object"), name)
            except ConnectError as e:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()  # or the transport outlives the refusal
                errors.append(f"{ep.address}:{ep.port}: {e}")
                continue
            return reader, writer
        raise ConnectError(f"{name}: no instance answered: " + "; ".join(errors))

    async def connect_trio(
        self, name: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> trio.SSLStream[trio.SocketStream]:
        """``connect`` for trio: a ``trio.SSLStream`` whose handshake is done, to a verified
        instance of ``name``; same errors."""
        snap, eps = await trio.to_thread.run_sync(self._instances, name, timeout)
        errors = []
        for ep in eps:
            stream: trio.SSLStream[trio.SocketStream] | None = None
            try:
                with trio.fail_after(timeout if timeout is not None else float("inf")):
                    tcp = await trio.open_tcp_stream(ep.address, ep.port)
                    stream = trio.SSLStream(tcp, snap.tls.client, server_hostname=None)
                    await stream.do_handshake()
                check_server(snap, stream, name)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectError) as e:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                errors.append(f"{ep.address}:{ep.port}: {e or type(e).__name__}")
                continue
            return stream
        raise ConnectError(f"{name}: no instance answered: " + "; ".join(errors))

    async def serve_connect(
        self,
        handler: Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[object]],
        port: int,
        *,
        host: str = "127.0.0.1",
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve raw TCP over Connect, for trio: accept on ``host``:``port`` (port 0: any;
        ``nursery.start`` returns the listeners), complete the mutual-TLS handshake with
        ``server_ssl_context()``, ``authorize`` the peer, and run ``handler(stream)`` for an
        allowed one, in its own task; a refused one is closed before any byte is read, and
        logged once with the reason. Serves until cancelled. ``host`` defaults to the loopback:
        pass the address other machines reach (the one registered in the catalog)."""
        ctx = self.server_ssl_context()

        async def one(tcp: trio.SocketStream) -> None:
            stream = trio.SSLStream(tcp, ctx, server_side=True)
            try:
                with trio.fail_after(handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as e:
                log.info("%s: handshake failed: %s", self.name, e.__cause__ or e)
                await trio.aclose_forcefully(stream)
                return
            decision = self.authorize(stream)
            if not decision.allowed:
                log.info("%s: refused a peer: %s", self.name, decision.reason)
                await trio.aclose_forcefully(stream)
                return
            async with stream:
                try:
                    await handler(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    # The peer went away mid-conversation: its doing, not the server's end.
                    log.debug("%s: a connection ended: %s", self.name, e)

        await trio.serve_tcp(one, port, host=host, task_status=task_status)

    def httpx_transport(self, *, max_connections: int = 10) -> _httpx.Transport:
        """An httpx transport over Connect, for ``httpx.Client(transport=...)`` and
        ``httpx.AsyncClient(transport=...)`` alike (asyncio or trio): a request to
        ``http://db/path`` goes to a healthy instance of service ``db`` (the URL's port is
        ignored) over ``connect``'s verified mutual TLS, keep-alive connections pooled per
        service. ``https://`` is refused (``httpx.UnsupportedProtocol``: the mesh is the TLS);
        no instance reachable is ``httpx.ConnectError``."""
        self._check_process()
        # Imported here: httpx and httpcore cost an app that never calls this some 40 ms.
        from trellis.connect._httpx import Transport

        return Transport(self, max_connections=max_connections)


@contextlib.asynccontextmanager
async def open_service(
    name: str,
    *,
    address: str = api.DEFAULT_ADDRESS,
    token: str | None = None,
    ca_file: str | None = None,
) -> AsyncIterator[Service]:
    """``Service`` for trio: the follower runs as a task of the caller's trio run, started on
    entry and cancelled on exit. Same arguments as ``Service``; ``ready()`` and the
    ``connect*`` calls block their thread, so from trio use ``await
    trio.to_thread.run_sync(svc.ready)`` and ``connect_trio``."""
    svc = Service(name, address=address, token=token, ca_file=ca_file, _start=False)
    svc._token = trio.lowlevel.current_trio_token()
    try:
        async with trio.open_nursery() as nursery:
            svc._cancel = nursery.cancel_scope
            nursery.start_soon(svc._follow)
            try:
                yield svc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        svc._current.close()
        svc._client.close()
