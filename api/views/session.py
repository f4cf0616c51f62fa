"""``/v1/session/*``: Consul's session API (create, destroy, renew, info, node, list).

ACLs as Consul: ``session:write`` on the session's node to create, destroy or renew it,
``session:read`` on its node to read it (lists hold only the readable ones). The reads are
blocking queries on topic ``session``.
"""

from __future__ import annotations

import time

from flask import Blueprint

from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, NotFound
from trellis.api.feed import Watch
from trellis.api.http import blocking, json_body, json_response, services
from trellis.api.sessions import parse_create, session_json
from trellis.api.store.sessions import Session
from trellis.api.views.catalog import check_dc

bp = Blueprint("session", __name__)

_WATCH = Watch("session", prefixes=("",))


def _session_id(session_id: str) -> str:
    # Session IDs are UUIDs; anything else names no session (and must not reach a log or the
    # store with control characters in it).
    if len(session_id) > 128 or any(ord(c) < 32 or ord(c) == 127 for c in session_id):
        raise BadRequest("invalid session ID")
    return session_id


@bp.put("/v1/session/create")
def create():
    check_dc()
    settings = services().settings
    body = json_body(required=False)
    s = parse_create(body, default_node=settings.node_name, ttl_min=settings.session_ttl_min)
    acl.require(acl.current().session_write(s.node), f"session:write on node {s.node!r}")
    stored = services().store.session_create(s, now=time.time())
    return json_response({"ID": stored.id})


@bp.put("/v1/session/destroy/<session>")
def destroy(session: str):
    check_dc()
    store = services().store
    authz = acl.current()  # first: an unknown token is refused whether the session exists
    s = store.session_get(_session_id(session))
    if s is not None:
        acl.require(authz.session_write(s.node), f"session:write on node {s.node!r}")
        store.session_destroy(s.id, now=time.time())
    # Consul answers true for a session that is already gone: destroy is idempotent.
    return json_response(True)


@bp.put("/v1/session/renew/<session>")
def renew(session: str):
    check_dc()
    store = services().store
    authz = acl.current()  # first, as in destroy
    s = store.session_get(_session_id(session))
    if s is not None:
        acl.require(authz.session_write(s.node), f"session:write on node {s.node!r}")
        s = store.session_renew(s.id, now=time.time())
    if s is None:
        raise NotFound(f"Session id '{session}' not found")
    return json_response([session_json(s)], index=store.topic_index("session"))


def _read(compute_sessions) -> object:
    store = services().store
    authz = acl.current()  # before parking: an unknown token is refused at once

    def compute():
        index = store.topic_index("session")  # first: see blocking
        return compute_sessions(), index

    found, index = blocking(_WATCH, compute)
    visible = [s for s in found if authz.session_read(s.node)]
    extra = {"X-Consul-Results-Filtered-By-ACLs": "true"} if len(visible) < len(found) else None
    return json_response([session_json(s) for s in visible], index=index, headers=extra)


@bp.get("/v1/session/info/<session>")
def info(session: str):
    check_dc()
    store = services().store
    sid = _session_id(session)

    def one() -> list[Session]:
        s = store.session_get(sid)
        return [s] if s is not None else []

    return _read(one)


@bp.get("/v1/session/node/<node>")
def node(node: str):
    check_dc()
    store = services().store
    return _read(lambda: store.sessions(node=node))


@bp.get("/v1/session/list")
def list_():
    check_dc()
    store = services().store
    return _read(lambda: store.sessions())
