"""``/v1/query``: Consul's prepared queries (create, list, read, update, delete, execute,
explain); the bodies and the selection are in ``trellis.api.queries``.

Every query lives in one system document (``queries.DOC``), written with compare-and-set on
its index: a write reads the document, changes it, and writes it back only if no other write
came in between (else it tries again), so that names stay unique across every server process
sharing the store without a table of their own. Queries are few and small (at most
``MAX_QUERIES``); reads are one indexed row.

ACLs, as Consul's: creating, changing or deleting a query needs ``query:write`` on its name
(on the old name too when an update renames it), reading it ``query:read``; rules match names
by prefix. An unnamed query is governed as the name ``""`` (Consul exempts it from every rule:
see ``trellis.api.queries.acl_name``). Executing needs no query rule: the results are what the
query's own ``Token`` (or, without one, the caller's) may read (``service:read`` and
``node:read``). The reads always show ``<hidden>`` for a token: Trellis keeps only its hash.
An update that sends ``<hidden>`` back keeps the stored token, which needs ``acl:write``: the
token is a delegation of its reads, and ``query:write`` alone must not re-aim it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint

from trellis.api import catalog as cat
from trellis.api import queries as q
from trellis.api.acl import service as acl
from trellis.api.acl.cache import hash_secret
from trellis.api.acl.rules import Authorizer
from trellis.api.errors import BadRequest, Conflict, NotFound, PermissionDenied
from trellis.api.feed import Watch
from trellis.api.http import blocking, flag, json_body, json_response, services, uint_arg
from trellis.api.views.catalog import check_dc

bp = Blueprint("query", __name__)

WATCH = Watch("system", exact=(q.DOC,))
#: Compare-and-set rounds before a write gives up (only under a storm of query writes).
WRITE_TRIES = 20


def _query_id(query_id: str) -> str:
    if len(query_id) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in query_id):
        raise BadRequest("invalid query ID or name")
    return query_id


def _not_found() -> NotFound:
    return NotFound("Query not found")


def _update(mutate: Callable[[list[dict[str, Any]]], None]) -> None:
    """Apply ``mutate`` to the list of queries and store it, with compare-and-set on the
    document (see the module docstring). ``mutate`` raises to write nothing."""
    store = services().store
    for _ in range(WRITE_TRIES):
        docs, index = q.stored(store)  # queries of ended sessions are dropped here
        mutate(docs)
        if store.system_write({q.DOC: {"Queries": docs}}, expect={q.DOC: index}) is not None:
            return
    raise Conflict("prepared queries are being changed by many writers at once; try again")


def _check_unique(docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    for other in docs:
        if other["ID"] == doc["ID"]:
            continue
        if doc["Name"] and other["Name"] == doc["Name"]:
            raise BadRequest(f"Name {doc['Name']!r} aliases an existing query name")
        if doc["Name"] and other["ID"] == doc["Name"]:
            raise BadRequest(f"Name {doc['Name']!r} aliases an existing query ID")
        if doc["Template"]["Type"] and other["Template"]["Type"] and other["Name"] == doc["Name"]:
            raise BadRequest("a template with this Name exists already")


def _check_session(doc: dict[str, Any]) -> None:
    if doc["Session"] and services().store.session_get(doc["Session"]) is None:
        raise BadRequest(f"invalid session {doc['Session']!r}")


def _require_write(authz: Authorizer, doc: dict[str, Any]) -> None:
    name = q.acl_name(doc)
    acl.require(authz.query_write(name), f"query:write on {name!r}")


def _may_read(authz: Authorizer, doc: dict[str, Any]) -> bool:
    return authz.query_read(q.acl_name(doc))


@bp.post("/v1/query")
def create():
    check_dc()
    authz = acl.current()  # first: an unknown token is refused before the body is looked at
    doc, token = q.parse_query(json_body(), query_id=str(uuid.uuid4()))
    if token == q.HIDDEN:
        raise BadRequest(
            f"Token: {q.HIDDEN!r} is what reads show for a query's token; send the token"
            " itself, or none"
        )
    _require_write(authz, doc)
    _check_session(doc)
    doc["TokenHash"] = hash_secret(token) if token else ""

    def add(docs: list[dict[str, Any]]) -> None:
        if len(docs) >= q.MAX_QUERIES:
            raise BadRequest(f"at most {q.MAX_QUERIES} prepared queries; delete one first")
        _check_unique(docs, doc)
        docs.append(doc)

    _update(add)
    return json_response({"ID": doc["ID"]})


def _read(compute_docs: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]):
    store = services().store
    authz = acl.current()  # before parking: an unknown token is refused at once

    def compute():
        docs, index = q.stored(store)
        return compute_docs(docs), index

    found, index = blocking(WATCH, compute)
    return authz, found, index


@bp.get("/v1/query")
def list_():
    check_dc()
    authz, found, index = _read(lambda docs: docs)
    visible = [d for d in found if _may_read(authz, d)]
    extra = {"X-Consul-Results-Filtered-By-ACLs": "true"} if len(visible) < len(found) else None
    return json_response([q.query_json(d) for d in visible], index=index, headers=extra)


@bp.get("/v1/query/<query_id>")
def get(query_id: str):
    check_dc()
    qid = _query_id(query_id)
    authz, found, index = _read(lambda docs: [d for d in docs if d["ID"] == qid])
    if not found:
        raise _not_found()
    if not _may_read(authz, found[0]):
        raise PermissionDenied()
    return json_response([q.query_json(found[0])], index=index)


@bp.put("/v1/query/<query_id>")
def update(query_id: str):
    check_dc()
    qid = _query_id(query_id)
    authz = acl.current()
    doc, token = q.parse_query(json_body(), query_id=qid)
    _require_write(authz, doc)
    _check_session(doc)

    def change(docs: list[dict[str, Any]]) -> None:
        at = next((i for i, d in enumerate(docs) if d["ID"] == qid), None)
        if at is None:
            raise _not_found()
        old = docs[at]
        _require_write(authz, old)  # renaming needs write on the old name too
        _check_unique(docs, doc)
        new = dict(doc)
        new["CreateIndex"] = old["CreateIndex"]
        if token == q.HIDDEN:
            # Sent back as read: keep the stored token. Only a token that manages ACLs may:
            # otherwise a holder of query:write alone could point a query that runs with a
            # stronger token at anything that token reads, for anyone who executes it.
            acl.require(authz.acl_write(), "acl:write (to keep a query's token)")
            new["TokenHash"] = old.get("TokenHash", "")
        else:
            new["TokenHash"] = hash_secret(token) if token else ""
        docs[at] = new

    _update(change)
    return json_response(None)


@bp.delete("/v1/query/<query_id>")
def delete(query_id: str):
    check_dc()
    qid = _query_id(query_id)
    authz = acl.current()

    def remove(docs: list[dict[str, Any]]) -> None:
        at = next((i for i, d in enumerate(docs) if d["ID"] == qid), None)
        if at is None:
            raise _not_found()
        _require_write(authz, docs[at])
        del docs[at]

    _update(remove)
    return json_response(None)


def _resolve(key: str) -> dict[str, Any]:
    docs, _ = q.stored(services().store)
    doc = q.resolve(docs, _query_id(key))
    if doc is None:
        raise _not_found()
    return doc


def _runs_as(doc: dict[str, Any]) -> Authorizer:
    """The rules a query's results are filtered by: its own token's, else the caller's."""
    if doc.get("TokenHash") and services().settings.acl_enabled:
        return services().acls.resolve_hash(doc["TokenHash"], indexes=acl.fresh_indexes())[1]
    return acl.current()


@bp.get("/v1/query/<query>/execute")
def execute(query: str):
    check_dc()
    acl.current()  # an unknown token is refused, whatever the query runs as
    limit = uint_arg("limit", maximum=1 << 31)
    connect = flag("connect")
    settings = services().settings
    store = services().store
    index = store.topic_index("catalog")  # first: the answer is at least this new
    doc = _resolve(query)
    authz = _runs_as(doc)
    name = doc["Service"]["Service"]
    nodes = []
    hidden = False
    for inst in q.select(store, doc, connect=connect):
        if not (authz.service_read(inst.service.name) and authz.node_read(inst.node.name)):
            hidden = True
            continue
        nodes.append(
            {
                "Node": cat.node_json(inst.node),
                "Service": cat.service_json(inst.service),
                "Checks": [
                    cat.check_json(c, inst.service.tags if c.service_id else ())
                    for c in inst.checks
                ],
            }
        )
    if limit:
        nodes = nodes[:limit]
    body = {
        "Service": name,
        "Nodes": nodes,
        "DNS": {"TTL": doc["DNS"]["TTL"]},
        "Datacenter": settings.datacenter,
        # Trellis has one datacenter: no failover target is ever tried.
        "Failovers": 0,
    }
    extra = {"X-Consul-Results-Filtered-By-ACLs": "true"} if hidden else None
    return json_response(body, index=index, headers=extra)


@bp.get("/v1/query/<query>/explain")
def explain(query: str):
    check_dc()
    authz = acl.current()
    doc = _resolve(query)
    name = q.acl_name(doc)
    acl.require(authz.query_read(name), f"query:read on {name!r}")
    return json_response({"Query": q.query_json(doc)})
