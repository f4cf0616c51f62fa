"""Intentions (``/v1/connect/intentions*``) and ``POST /v1/agent/connect/authorize``.

Decisions come from the per-process ``trellis.api.intentions.IntentionCache`` (a compiled
``trellis.proxy.authz.IntentionSet``, never older than the request), so ``authorize`` and
``check`` cost a few dictionary lookups, not a query.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask import Blueprint, request

from trellis.api import intentions as domain
from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, NotFound
from trellis.api.feed import Watch
from trellis.api.http import (
    accepts_filter,
    blocking,
    filter_arg,
    json_body,
    json_response,
    services,
    str_arg,
)
from trellis.api.schemas import load
from trellis.api.schemas.intentions import AuthorizeSchema, IntentionExactSchema, IntentionSchema
from trellis.api.store.security import IntentionRecord
from trellis.proxy import authz
from trellis.proxy import filtershapes as shapes

bp = Blueprint("intentions", __name__)

ALL = Watch("intentions", prefixes=("",))


def default_allow() -> bool:
    return domain.default_allow(services().settings)


def _intentions() -> authz.IntentionSet:
    """The intentions as of this request (the indexes the request's ACL check read too)."""
    return services().intentions.get(indexes=acl.fresh_indexes())


def intention_json(r: IntentionRecord) -> dict[str, Any]:
    return {
        "ID": r.id,
        "Description": r.description,
        "SourceNS": "default",
        "SourceName": r.source,
        "DestinationNS": "default",
        "DestinationName": r.destination,
        "SourceType": "consul",
        "Action": r.action,
        "Meta": dict(r.meta),
        "Precedence": authz.precedence(r.source, r.destination),
        "CreatedAt": r.created_at,
        "UpdatedAt": r.updated_at,
        "CreateIndex": r.create_index,
        "ModifyIndex": r.modify_index,
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    try:
        return authz.check_name(value)
    except authz.IntentionError as e:
        raise BadRequest(f"{what}: {e}") from None


# -- ACLs: intentions are managed per destination -------------------------------------------


def check_intention_read(destination: str) -> None:
    acl.require(acl.current().intention_read(destination), f"intentions:read on {destination!r}")


def check_intention_write(destination: str) -> None:
    """A team may manage only the intentions whose destination is its own service."""
    acl.require(acl.current().intention_write(destination), f"intentions:write on {destination!r}")


def check_service_write(name: str) -> None:
    acl.require_service_write(name)


# -- the ID-based API ---------------------------------------------------------------------------


@bp.get("/v1/connect/intentions")
@accepts_filter
def list_intentions():
    acl.current()  # an unknown token is a 403 even when there is nothing to filter
    flt = filter_arg(shapes.INTENTION)
    store = services().store

    def compute():
        # Consul's order (its state store sorts by IntentionPrecedenceSorter): precedence
        # descending, then source and destination names; ``consul intention list`` prints it.
        records, index = store.intentions_at()  # one snapshot: see blocking
        rows = [intention_json(r) for r in records]
        rows.sort(key=lambda d: (-d["Precedence"], d["SourceName"], d["DestinationName"]))
        return rows, index

    data, index = blocking(ALL, compute)
    data = [d for d in data if _readable(d["DestinationName"]) and (flt is None or flt(d))]
    return json_response(data, index=index)


def _readable(destination: str) -> bool:
    # Fix: this caught every exception, so an unknown token ("ACL not found", which Consul
    # answers 403) got a 200 with an empty list, and any other failure hid intentions.
    return acl.current().intention_read(destination)


@bp.post("/v1/connect/intentions")
def create():
    body = load(IntentionSchema, json_body())
    check_intention_write(body["destination"])
    now = _now()
    rec = services().store.intention_put(
        IntentionRecord(
            id=str(uuid.uuid4()),
            source=body["source"],
            destination=body["destination"],
            action=body["action"],
            description=body["description"],
            meta=body["meta"],
            created_at=now,
            updated_at=now,
        ),
        create_only=True,
    )
    return json_response({"ID": rec.id})


def _by_id(intention_id: str) -> IntentionRecord:
    try:
        uuid.UUID(intention_id)
    except ValueError:
        raise BadRequest(f"{intention_id!r} is not an intention ID (a UUID)") from None
    rec = services().store.intention(intention_id)
    if rec is None:
        raise NotFound(f"intention {intention_id} not found")
    return rec


@bp.get("/v1/connect/intentions/<intention_id>")
def get(intention_id: str):
    rec = _by_id(intention_id)
    check_intention_read(rec.destination)
    return json_response(intention_json(rec), index=rec.modify_index)


@bp.put("/v1/connect/intentions/<intention_id>")
def update(intention_id: str):
    rec = _by_id(intention_id)
    body = load(IntentionSchema, json_body())
    check_intention_write(rec.destination)
    check_intention_write(body["destination"])
    # Deleted meanwhile: the store's NotFoundInStore, a 404 at the boundary (api/app.py).
    services().store.intention_put(
        IntentionRecord(
            id=rec.id,
            source=body["source"],
            destination=body["destination"],
            action=body["action"],
            description=body["description"],
            meta=body["meta"],
            created_at=rec.created_at,
            updated_at=_now(),
        ),
        expect_id=rec.id,
    )
    return json_response(True)


@bp.delete("/v1/connect/intentions/<intention_id>")
def delete(intention_id: str):
    rec = _by_id(intention_id)
    check_intention_write(rec.destination)
    services().store.intention_delete(rec.id)
    return json_response(True)


# -- the name-based API ----------------------------------------------------------------------


def _pair() -> tuple[str, str]:
    source = _name(str_arg("source") or "", "source")
    destination = _name(str_arg("destination") or "", "destination")
    return source, destination


@bp.get("/v1/connect/intentions/exact")
def get_exact():
    source, destination = _pair()
    check_intention_read(destination)
    store = services().store

    def compute():
        # The index first: see blocking.
        index = store.topic_index(f"intentions/{destination}") or store.topic_index("intentions")
        return store.intention_exact(source, destination), index

    rec, index = blocking(Watch("intentions", exact=(destination,)), compute)
    if rec is None:
        resp = json_response(
            {
                "error": f"no intention {source} => {destination}",
                "code": "not_found",
                "status": 404,
            },
            status=404,
        )
        from trellis.api.http import add_index_headers

        add_index_headers(resp, index)
        return resp
    return json_response(intention_json(rec), index=index)


@bp.put("/v1/connect/intentions/exact")
def put_exact():
    source, destination = _pair()
    body = load(IntentionExactSchema, json_body())
    check_intention_write(destination)
    store = services().store
    existing = store.intention_exact(source, destination)
    now = _now()
    store.intention_put(
        IntentionRecord(
            id=existing.id if existing else str(uuid.uuid4()),
            source=source,
            destination=destination,
            action=body["action"],
            description=body["description"],
            meta=body["meta"],
            created_at=existing.created_at if existing else now,
            updated_at=now,
        )
    )
    return json_response(True)


@bp.delete("/v1/connect/intentions/exact")
def delete_exact():
    source, destination = _pair()
    check_intention_write(destination)
    store = services().store
    rec = store.intention_exact(source, destination)
    if rec is not None:
        store.intention_delete(rec.id)
    return json_response(True)


@bp.get("/v1/connect/intentions/match")
def match():
    acl.current()  # an unknown token is a 403 even when there is nothing to filter
    by = request.args.get("by")
    if by not in ("source", "destination"):
        raise BadRequest("by must be source or destination")
    names = request.args.getlist("name")
    if not names:
        raise BadRequest("name is required (repeatable)")
    names = [_name(n, "name") for n in names]
    for n in names:
        if by == "destination":
            check_intention_read(n)
    store = services().store

    def compute():
        # One read of the records and their index, for every name: the records give the full
        # shape (timestamps, indexes), the compiled set the order. The set is asked to be at
        # least as new as the records (a set older than the index would answer a new deny's
        # index without it, and the sidecar would wait a whole ``wait`` for it: see blocking).
        # If the set is newer, an intention it no longer has is left out and one the records
        # do not have yet too: the answer is then newer than its index, which costs the client
        # one more query, never a lost change.
        rows, index = store.intentions_at()
        # (The index was read after the request began, so the set is fresh enough for it.)
        iset = services().intentions.get(indexes={domain.INTENTIONS_TOPIC: index})
        records = {r.id: r for r in rows}
        out = {
            n: [intention_json(records[i.id]) for i in iset.match(by=by, name=n) if i.id in records]
            for n in names
        }
        return out, index

    data, index = blocking(ALL, compute)
    if by == "source":
        data = {n: [i for i in v if _readable(i["DestinationName"])] for n, v in data.items()}
    # What the server decides when no intention matches, so that a proxy deciding from these
    # intentions applies the same default (Consul's agents know it from their own config).
    default = "allow" if default_allow() else "deny"
    return json_response(data, index=index, headers={"X-Trellis-Intention-Default": default})


@bp.get("/v1/connect/intentions/check")
def check():
    source, destination = _pair()
    check_intention_read(destination)
    decision = _intentions().decide(source, destination, default_allow=default_allow())
    return json_response({"Allowed": decision.allowed})


@bp.post("/v1/agent/connect/authorize")
def authorize():
    body = load(AuthorizeSchema, json_body())
    target, uri = body["target"], body["uri"]
    check_service_write(target)
    decision = authz.authorize(
        uri,
        target,
        trust_domain=services().ca.trust_domain,
        datacenter=services().settings.datacenter,
        intentions=_intentions(),
        default_allow=default_allow(),
    )
    return json_response({"Authorized": decision.allowed, "Reason": decision.reason})
