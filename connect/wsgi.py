"""Connect for WSGI apps under gunicorn: intentions checked before the app runs, and one
``Service`` per worker process.

Theory of operation
-------------------
gunicorn terminates TLS itself, with the ``ssl.SSLContext`` its ``ssl_context`` hook returns
(gunicorn >= 21): ``WorkerService.ssl_context`` returns the worker's
``Service.server_ssl_context()``, so every handshake requires a client certificate from the
current roots and presents the current leaf. A verified client is not yet an allowed one:
``ConnectMiddleware`` decides each request, before the app sees it, on the connection it
came on. gunicorn's workers put that connection (the ``ssl.SSLSocket``) in
``environ["gunicorn.socket"]``; the middleware hands it to
``Service.authorize``, which reads the peer's verified leaf from it (no parsing of anything the
client sent) and decides by the current intentions. Each request is decided anew, so a
keep-alive connection gets 403 from the first request after a deny.

Fail closed, always: no ``gunicorn.socket`` (another server, or gunicorn's ``gevent_pywsgi``
worker), a connection that is not TLS, or one with no client certificate, is answered 403
naming the reason. Never is a request let through for want of a peer to decide on.

Workers: sync and gthread. The gevent worker puts the connection in the environ too, and
the middleware would decide on it; but it monkey-patches the worker after ``post_fork``, which
turns threads into greenlets, and the ``Service``'s follower (a thread running trio, which
starts threads of its own) then stops at its next blocking call: the leaf would age and the
intentions go stale with nothing said. So ``WorkerService.post_fork`` refuses such a worker
(and ``ssl_context`` any worker found patched), and gunicorn stops with the reason rather
than serve it (a gevent app can keep a sidecar in front of it).

Forks: gunicorn forks its workers from a master; a thread does not survive ``fork()``, so the
``Service`` (whose follower is a thread) is made in each worker by the ``post_fork`` hook and
closed by ``worker_exit``. ``WorkerService`` holds those hooks; the config file and the app
reach the same one by name (``worker_service("web")``), since gunicorn loads the config file
as a module of its own. A ``Service`` made in the master and used in a worker raises
``ConnectError`` (see ``trellis.connect._service``).

The recipe, ``gunicorn.conf.py``::

    from trellis.connect.wsgi import WorkerService

    web = WorkerService("web", address="http://127.0.0.1:8500")
    post_fork = web.post_fork
    worker_exit = web.worker_exit
    ssl_context = web.ssl_context
    # gunicorn serves TLS only when a certfile is set, and checks that it exists; the
    # ssl_context hook above replaces its context, so this file is never read.
    certfile = __file__

and in the app::

    from trellis.connect.wsgi import ConnectMiddleware, worker_service

    app.wsgi_app = ConnectMiddleware(app.wsgi_app, worker_service("web"))
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any

from trellis.connect._service import GREEN_THREADS, Service, check_real_threads
from trellis.connect._state import ConnectError
from trellis.proxy import authz, spiffe

__all__ = [
    "PEER_ID",
    "PEER_SERVICE",
    "ConnectMiddleware",
    "WorkerService",
    "worker_service",
]

log = logging.getLogger("trellis.connect")

#: The environ key holding the allowed peer's SPIFFE ID (``spiffe://.../svc/web``).
PEER_ID = "trellis.connect.peer_id"
#: The environ key holding the allowed peer's service name (``web``).
PEER_SERVICE = "trellis.connect.peer_service"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: How long ``WorkerService.post_fork`` waits for the first leaf by default: well below
#: gunicorn's worker timeout (30 s), which also runs while ``post_fork`` does.
READY_TIMEOUT = 10.0

#: gunicorn's workers that monkey-patch threads into greenlets, after ``post_fork``.
PATCHING_WORKERS = frozenset({"gunicorn.workers.ggevent", "gunicorn.workers.geventlet"})

_registry: dict[str, WorkerService] = {}
_registry_lock = threading.Lock()


def _forbidden(reason: str) -> tuple[str, list[tuple[str, str]], bytes]:
    """The 403 a refused peer gets: the status line, headers and the JSON body of Trellis's
    errors (``{"error", "code", "status"}``), ``error`` naming the reason."""
    body = json.dumps({"error": reason, "code": "permission_denied", "status": 403}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return "403 Forbidden", headers, body


def _decide(
    service: Service, conn: object
) -> tuple[authz.Decision | None, str, spiffe.ServiceID | None]:
    """The decision on the peer of ``conn`` (the connection a request came on), or None and
    why there is no peer to decide on."""
    if conn is None:
        return (
            None,
            (
                "no connection to authorize: the server put no gunicorn.socket in the WSGI "
                "environ (serve with gunicorn's sync or gthread worker)"
            ),
            None,
        )
    if not isinstance(conn, ssl.SSLSocket) and not callable(getattr(conn, "getpeercert", None)):
        return None, "the connection is not TLS: serve with WorkerService.ssl_context", None
    decision, identity = service._admit(conn)  # type: ignore[arg-type]
    return decision, decision.reason, identity


class ConnectMiddleware:
    """WSGI middleware: each request's peer is authorized by ``service``'s intentions before
    ``app`` runs. An allowed request reaches ``app`` with the peer's SPIFFE ID in
    ``environ[PEER_ID]`` and its service name in ``environ[PEER_SERVICE]``; any other gets
    403 with a JSON body whose ``error`` says why (a deny, no client certificate, no TLS, a
    server that does not expose the connection), and ``app`` never runs.

    ``service`` is a ``Service`` or a callable returning this process's (such as
    ``worker_service("web")``), called per request: the app module may be imported before
    the worker's ``Service`` exists. ConnectError from it (no ``Service`` in this process, or
    one made before the fork) is the deployment's fault: it propagates, and the server
    answers 500.
    """

    def __init__(self, app: WSGIApp, service: Service | Callable[[], Service]) -> None:
        self.app = app
        self._service = service
        self._warned: set[str] = set()

    def _get_service(self) -> Service:
        s = self._service
        return s if isinstance(s, Service) else s()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """One request: 403 for a peer that may not call, else ``app``'s answer."""
        service = self._get_service()
        decision, reason, identity = _decide(service, environ.get("gunicorn.socket"))
        if decision is None and reason not in self._warned:
            # The deployment's mistake, not the peer's: say it once where the operator looks.
            self._warned.add(reason)
            log.error("%s: refusing every request: %s", service.name, reason)
        if decision is None or not decision.allowed or identity is None:
            status, headers, body = _forbidden(reason)
            start_response(status, headers)
            return [body]
        environ[PEER_ID] = identity.uri
        environ[PEER_SERVICE] = identity.service
        return self.app(environ, start_response)


class WorkerService:
    """This worker process's ``Service``, made after gunicorn's fork: the hooks of the recipe
    in the module's docstring. The arguments are ``Service``'s; ``ready_timeout`` is how long
    ``post_fork`` waits for the first leaf (past it the worker starts anyway and refuses
    handshakes until the leaf comes: a worker that exited instead would be respawned in a
    loop while the control plane is away). Keep it below gunicorn's worker ``timeout``
    (30 s by default), past which the master kills a worker that has not checked in.

    Registered under ``name`` when made, for ``worker_service(name)``; making a second one of
    the same name replaces it (a reloaded config file)."""

    def __init__(
        self,
        name: str,
        *,
        address: str | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.name = name
        self._kwargs: dict[str, Any] = {"token": token, "ca_file": ca_file}
        if address is not None:
            self._kwargs["address"] = address
        self.ready_timeout = ready_timeout
        self._service: Service | None = None
        with _registry_lock:
            _registry[name] = self

    def start(self) -> Service:
        """Make this process's ``Service`` and wait up to ``ready_timeout`` for its first leaf
        (logged, not raised, past it). A ``Service`` inherited from before a fork is simply
        replaced: nothing of it runs in this process. ConnectError if the control plane
        refuses the service (its token may not act as it: the operator's fault)."""
        self._service = Service(self.name, **self._kwargs)
        try:
            self._service.ready(self.ready_timeout)
        except TimeoutError as e:
            log.warning(
                "%s: %s; serving once it comes (handshakes are refused until then)", self.name, e
            )
        return self._service

    def post_fork(self, server: object, worker: object) -> None:
        """gunicorn's ``post_fork`` hook: make this worker's ``Service``. ConnectError if the
        worker is one that monkey-patches threads (gevent, eventlet: see the module's
        docstring) or the control plane refuses the service (its token may not act as it):
        the operator's mistakes, raised before the worker boots, so gunicorn stops with
        "Worker failed to boot" instead of respawning it in a loop."""
        if type(worker).__module__ in PATCHING_WORKERS:
            raise ConnectError(GREEN_THREADS)
        self.start()

    def worker_exit(self, server: object, worker: object) -> None:
        """gunicorn's ``worker_exit`` hook: close this worker's ``Service``."""
        if self._service is not None:
            self._service.close()

    def ssl_context(self, config: object, default_ssl_context_factory: object) -> ssl.SSLContext:
        """gunicorn's ``ssl_context`` hook (gunicorn >= 21): this worker's
        ``Service.server_ssl_context()`` instead of gunicorn's own context (whose certfile
        and keyfile are then never read). ConnectError in a gevent worker: gevent's
        monkey-patching, done after ``post_fork``, leaves the Service's follower unable to
        run (see ``Service``), so the worker fails to boot, saying so."""
        check_real_threads()
        return self().server_ssl_context()

    def __call__(self) -> Service:
        """This process's ``Service``. ConnectError if ``post_fork`` did not make one in this
        process (the config file lacks the hook, or this is the master): the deployment's
        mistake."""
        s = self._service
        if s is None:
            raise ConnectError(
                f"no Service {self.name!r} in this process: set post_fork = "
                "<WorkerService>.post_fork in gunicorn's config file"
            )
        return s


def worker_service(name: str) -> WorkerService:
    """The ``WorkerService`` the gunicorn config file made for ``name`` (it is called for
    this process's ``Service``). ConnectError if there is none: the config file does not make
    it, or this process was not started by gunicorn with that config file."""
    with _registry_lock:
        found = _registry.get(name)
    if found is None:
        raise ConnectError(
            f"no WorkerService {name!r}: make one in gunicorn's config file "
            "(see trellis.connect.wsgi)"
        )
    return found
