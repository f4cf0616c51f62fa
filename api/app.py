"""The application factory: ``create_app(settings)`` builds a Flask app around one store.

Nothing happens at import time. Each gunicorn worker calls ``create_app`` after it has forked
(the app is never preloaded), so every worker has its own store connections and its own
change feed, and follows the other workers' writes through the store (see ``trellis.api.feed``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from trellis.api import __version__, browsers, longpoll
from trellis.api.acl.cache import ACL_TOPIC, AuthorizerCache
from trellis.api.ca.leaves import AgentLeaves
from trellis.api.ca.manager import CAManager
from trellis.api.ca.secrets import load_sealer
from trellis.api.errors import BadRequest, Conflict, NotFound, TrellisError
from trellis.api.feed import FreshReads, SharedReads
from trellis.api.intentions import INTENTIONS_TOPIC, IntentionCache
from trellis.api.longpoll import ParkedClients
from trellis.api.members import Membership
from trellis.api.settings import Settings
from trellis.api.store import SQLITE, open_store, store_kind
from trellis.api.store.base import PASSING, Check, Node, Registration, Service, Store
from trellis.api.store.errors import (
    InvalidSession,
    NotFoundInStore,
    SnapshotRefused,
    StoreConflict,
    StoreError,
    UnstorableValue,
)

log = logging.getLogger("trellis.api")

SPEC_PATH = Path(__file__).resolve().parent / "openapi.yaml"


@dataclass
class AppServices:
    settings: Settings
    store: Store
    store_kind: str
    ca: CAManager
    #: The agent endpoint's leaves, one per service in the cluster (api/ca/leaves.py).
    leaves: AgentLeaves
    #: This process among the server processes sharing the store (splits the CSR limits).
    members: Membership
    #: Parked blocking queries per client address, capped (see api.longpoll).
    parked_clients: ParkedClients
    #: Results of blocking reads, shared by the queries one write wakes (see api.http).
    shared_reads: SharedReads = field(default_factory=SharedReads)
    stop: threading.Event = field(default_factory=threading.Event)
    #: Whether this process expires sessions (api/store/sessions.py), as of the last round.
    reaper: bool = False
    threads: list[threading.Thread] = field(default_factory=list)
    #: The store's ACL and intention indexes, from a read begun after the caller asked
    #: (shared by the requests that ask together); what keeps the two caches below fresh.
    fresh: FreshReads[dict[str, int]] = field(init=False)
    intentions: IntentionCache = field(init=False)
    acls: AuthorizerCache = field(init=False)

    def __post_init__(self) -> None:
        store = self.store
        self.fresh = FreshReads(lambda: store.topic_indexes(ACL_TOPIC, INTENTIONS_TOPIC))
        self.intentions = IntentionCache(store, fresh=self.fresh.get)
        self.acls = AuthorizerCache(
            store,
            default_allow=self.settings.acl_default_policy == "allow",
            fresh=self.fresh.get,
        )

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        self.members.leave()
        self.store.close()


def create_app(settings: Settings, *, store: Store | None = None, background: bool = True) -> Flask:
    # instance_path given: Flask would look for it from the top package, and "trellis" is a
    # namespace package, which Flask cannot place under an editable install. Trellis keeps
    # nothing in an instance folder (its state is in the store and the data dir).
    app = Flask("trellis.api", instance_path=str(Path(__file__).resolve().parent))
    app.config["MAX_CONTENT_LENGTH"] = max(settings.http_max_body, settings.kv_max_value_size) + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if store is None:
        store = open_store(settings.store_url, **_store_options(settings))
    kind = store_kind(settings.store_url)
    sealer = load_sealer(settings.ca_seal_key, settings.data_dir, shared_store=kind != SQLITE)
    members = Membership(store)
    # Before the first request: from it on, this process enforces its share of the limits.
    members.beat(force=True)
    ca = CAManager(
        store,
        datacenter=settings.datacenter,
        sealer=sealer,
        bootstrap=(settings.ca_provider, settings.ca_config),
        members=members.share,
        min_leaf_ttl=settings.ca_min_leaf_ttl,
    )
    svc = AppServices(
        settings=settings,
        store=store,
        store_kind=kind,
        ca=ca,
        leaves=AgentLeaves(store, ca, sealer),
        members=members,
        parked_clients=ParkedClients(settings.blocking_max_per_client),
    )
    app.extensions["trellis"] = svc

    from trellis.api.views import (
        acl,
        acl_login,
        agent,
        catalog,
        config,
        connect_ca,
        coordinate,
        event,
        health,
        intentions,
        kv,
        operator,
        query,
        session,
        snapshot,
        spec,
        status,
        txn,
    )

    for module in (
        kv,
        catalog,
        health,
        agent,
        status,
        connect_ca,
        intentions,
        acl,
        acl_login,
        spec,
        session,
        txn,
        snapshot,
        event,
        query,
        coordinate,
        operator,
        config,
    ):
        app.register_blueprint(module.bp)
    operator.install_request_metrics(app)

    _error_handlers(app)
    longpoll.install(app)
    browsers.install(app, settings)  # web pages: cross-origin writes, dev's Host check
    from trellis.api.http import redirect_unclean_path, refuse_filter, refuse_peer

    app.before_request(redirect_unclean_path)
    app.before_request(refuse_filter)
    app.before_request(refuse_peer)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    if settings.register_node:
        register_local_node(store, settings)
    _init_ca(ca)
    if settings.acl_enabled:
        with app.app_context():
            from trellis.api.acl.service import ensure_builtins, initial_management

            ensure_builtins()
            if settings.acl_initial_management_token:
                initial_management(settings.acl_initial_management_token)
    if background:
        store.start_follower()
        t = threading.Thread(
            target=_maintenance, args=(svc,), name="trellis-maintenance", daemon=True
        )
        t.start()
        svc.threads.append(t)
    return app


def _store_options(settings: Settings) -> dict:
    if store_kind(settings.store_url) == SQLITE:
        return {"poll_interval": settings.sqlite_poll_interval}
    return {"poll_interval": settings.pg_poll_interval}


#: The service every Consul server registers for itself, which clients look up to find the
#: servers (``consul.service.consul``, ``catalog/service/consul``).
CONSUL_SERVICE = "consul"


def consul_service(settings: Settings) -> Service:
    """This server as Consul's ``consul`` service: the port is the HTTP API's (Trellis has no
    RPC port; the API is what a client that found a server talks to). No tags, as Consul's
    (clients compare ``catalog/services`` with ``{"consul": []}``); Trellis's own name is in
    its Meta (``implementation``)."""
    return Service(
        node=settings.node_name,
        id=CONSUL_SERVICE,
        name=CONSUL_SERVICE,
        port=settings.http_port,
        meta={"implementation": "trellis", "version": __version__},
    )


def register_local_node(store: Store, settings: Settings) -> None:
    """Put this server's node in the catalog, with the always-passing ``serfHealth`` check
    that Consul clients expect to see on every node and the ``consul`` service that they look
    up to find the servers. Run at start and again by the maintenance loop, which puts back
    what was removed (a deregistration, a restored snapshot): cheap when nothing changed."""
    existing = store.node(settings.node_name)
    node = Node(
        name=settings.node_name,
        id=existing.id if existing else "",
        address=settings.node_address,
        datacenter=settings.datacenter,
        tagged_addresses={"lan": settings.node_address, "wan": settings.node_address},
        meta=dict(existing.meta) if existing else {},
    )
    health = Check(
        node=settings.node_name,
        check_id="serfHealth",
        name="Serf Health Status",
        status=PASSING,
        output="Agent alive and reachable",
        type="",
    )
    server = consul_service(settings)
    have = {c.check_id: c for c in store.checks(node=settings.node_name)}
    same = existing is not None and (existing.address, existing.datacenter) == (
        node.address,
        node.datacenter,
    )
    listed = {s.id: s for s in store.services(node=settings.node_name)}.get(CONSUL_SERVICE)
    if (
        same
        and "serfHealth" in have
        and have["serfHealth"].status == PASSING
        and listed is not None
        and (listed.name, listed.port, dict(listed.meta), listed.tags)
        == (server.name, server.port, dict(server.meta), server.tags)
    ):
        return
    store.register(Registration(node=node, services=(server,), checks=(health,)))


def leave_catalog(store: Store, settings: Settings) -> None:
    """Take this server's ``consul`` service out of the catalog (its graceful stop), so that
    clients stop finding it. The node and its other services stay (a node agent's own)."""
    if settings.register_node:
        store.deregister_service(settings.node_name, CONSUL_SERVICE)


def _init_ca(ca: CAManager) -> bool:
    """Make the cluster's first CA root if there is none. A provider that is down (Vault) is
    not fatal: the CA endpoints answer 503 and the maintenance loop tries again."""
    try:
        ca.ensure_initialized()
        return True
    except TrellisError as e:
        log.error("the CA is not initialized: %s", e.message)
        return False


def _maintenance(svc: AppServices) -> None:
    """Background chores, about once a ``ttl_check_interval``: tell the other server
    processes this one is alive (every few seconds, see api.members); turn TTL checks that were
    not refreshed critical; expire sessions, reap expired ACL tokens and login tokens, in the
    one process that holds the reaper role; set up the CA if its provider was down at start;
    prune old roots; every 10 s, put this server's node, ``serfHealth`` and ``consul``
    service back if they went missing."""
    ca_ready = svc.ca.initialized()
    last_prune = last_catalog = 0.0
    while not svc.stop.wait(svc.settings.ttl_check_interval):
        try:
            svc.store.expire_ttl_checks(time.time())
            # One process of all those sharing the store expires sessions (see
            # Store.hold_reaper_role); a process that loses the store loses the role.
            svc.reaper = False
            svc.reaper = svc.store.hold_reaper_role()
            if svc.reaper:
                svc.store.expire_sessions(time.time())
                # Expired ACL tokens already fail to resolve; this deletes them.
                svc.store.acl_expire_tokens(time.time())
                svc.store.acl_login_tokens_reap(time.time())
            if not ca_ready:
                ca_ready = _init_ca(svc.ca)
            if svc.settings.register_node and time.monotonic() - last_catalog > 10:
                last_catalog = time.monotonic()
                register_local_node(svc.store, svc.settings)
            if time.monotonic() - last_prune > 60:
                last_prune = time.monotonic()
                svc.ca.prune()
            svc.members.beat()
        except Exception as e:  # keep going: the store may be back on the next round
            log.warning("maintenance: %s", e)


#: What each of the store's refusals means to an HTTP client.
_STORE_TO_HTTP: dict[type[StoreError], type[TrellisError]] = {
    StoreConflict: Conflict,
    NotFoundInStore: NotFound,
    UnstorableValue: BadRequest,
    InvalidSession: BadRequest,
    SnapshotRefused: BadRequest,
}


def http_error(e: StoreError) -> TrellisError:
    """The HTTP error of a store refusal (a new kind of refusal without an entry is a 500)."""
    for kind, error in _STORE_TO_HTTP.items():
        if isinstance(e, kind):
            return error(e.message)
    return TrellisError(e.message)


def _error_handlers(app: Flask) -> None:
    def render(status: int, message: str, code: str, headers: dict | None = None) -> Response:
        from trellis.api.http import json_response

        return json_response(
            {"error": message, "code": code, "status": status}, status=status, headers=headers
        )

    @app.errorhandler(TrellisError)
    def _trellis(e: TrellisError):
        if e.status == 500:
            # Ours, not the client's (a CA seal key that does not fit): the operator reads
            # the log, so it says what the client was told. No traceback: the message is it.
            log.error("%s %s: %s", request.method, request.path, e.message)
        return render(e.status, e.message, e.code, e.headers)

    @app.errorhandler(StoreError)
    def _store(e: StoreError):
        # The one place where the store's refusals become HTTP errors (trellis.api.store.errors).
        return _trellis(http_error(e))

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        status = e.code or 500
        message = e.description or e.name
        if status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        elif status == 413:
            message = "request body is too large"
        headers = {}
        if status == 405 and e.get_response().headers.get("Allow"):
            headers["Allow"] = e.get_response().headers["Allow"]
        code = e.name.lower().replace(" ", "_")
        return render(status, message, code, headers)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        # Our fault, not the client's: log the traceback, tell the client only that it happened.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render(500, "internal error; see the server log", "internal")
