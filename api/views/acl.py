"""``/v1/acl/*``: bootstrap, tokens and policies, in Consul's shapes.

Token secrets are shown once, when a token is made (bootstrap or create); the store keeps only
their SHA-256, so a later read cannot show them, and neither can a copy of the database.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask import Blueprint

from trellis.api.acl import service as acl
from trellis.api.acl.rules import RulesError, parse_rules
from trellis.api.errors import BadRequest, NotFound, PermissionDenied, TrellisError
from trellis.api.http import json_body, json_response, services
from trellis.api.store.security import ACLPolicy, ACLToken

bp = Blueprint("acl", __name__)

TOKEN_FIELDS = {"AccessorID", "SecretID", "Description", "Policies", "Local", "ExpirationTTL"}
POLICY_FIELDS = {"ID", "Name", "Description", "Rules", "Datacenters"}
READ_ONLY = {"CreateIndex", "ModifyIndex", "Hash", "CreateTime"}


class ACLDisabled(TrellisError):
    status = 401
    code = "acl_disabled"


def _enabled() -> None:
    if not services().settings.acl_enabled:
        raise ACLDisabled("ACL support disabled")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def policy_json(p: ACLPolicy) -> dict[str, Any]:
    return {
        "ID": p.id,
        "Name": p.name,
        "Description": p.description,
        "Rules": p.rules,
        "Datacenters": list(p.datacenters),
        "CreateIndex": p.create_index,
        "ModifyIndex": p.modify_index,
    }


def token_json(t: ACLToken, secret: str | None = None) -> dict[str, Any]:
    store = services().store
    policies = []
    for pid in t.policies:
        p = store.acl_policy(policy_id=pid)
        if p is not None:
            policies.append({"ID": p.id, "Name": p.name})
    out: dict[str, Any] = {
        "AccessorID": t.accessor_id,
        "Description": t.description,
        "Policies": policies,
        "Local": t.local,
        "CreateTime": t.create_time,
        "CreateIndex": t.create_index,
        "ModifyIndex": t.modify_index,
    }
    if secret is not None:
        out["SecretID"] = secret
    return out


def _uuid(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"{what} {value!r} is not a UUID") from None


@bp.put("/v1/acl/bootstrap")
def bootstrap():
    _enabled()
    secret = str(uuid.uuid4())
    token = acl.bootstrap(secret)
    if token is None:
        raise PermissionDenied("ACL bootstrap no longer allowed")
    return json_response(token_json(token, secret))


# -- policies ------------------------------------------------------------------------------------


def _policy_body(body: dict, policy_id: str) -> ACLPolicy:
    unknown = set(body) - POLICY_FIELDS - READ_ONLY
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("Name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise BadRequest("Name is required: a string of 1-128 characters")
    if not all(c.isalnum() or c in "-_" for c in name):
        raise BadRequest("Name may hold only letters, digits, '-' and '_'")
    rules = body.get("Rules", "")
    if not isinstance(rules, str):
        raise BadRequest("Rules must be a string (HCL or JSON)")
    try:
        parse_rules(rules)
    except RulesError as e:
        raise BadRequest(f"Rules: {e}") from None
    desc = body.get("Description", "")
    if not isinstance(desc, str):
        raise BadRequest("Description must be a string")
    dcs = body.get("Datacenters") or []
    if not isinstance(dcs, list) or not all(isinstance(d, str) for d in dcs):
        raise BadRequest("Datacenters must be a list of strings")
    return ACLPolicy(id=policy_id, name=name, description=desc, rules=rules, datacenters=tuple(dcs))


@bp.put("/v1/acl/policy")
def policy_create():
    _enabled()
    acl.require(acl.current().acl_write(), "acl:write")
    body = json_body()
    if body.get("ID"):
        raise BadRequest("ID is assigned by the server on create")
    p = services().store.acl_policy_put(_policy_body(body, str(uuid.uuid4())), create=True)
    return json_response(policy_json(p))


@bp.get("/v1/acl/policy/<policy_id>")
def policy_read(policy_id: str):
    _enabled()
    acl.require(acl.current().acl_read(), "acl:read")
    p = services().store.acl_policy(policy_id=_uuid(policy_id, "policy ID"))
    if p is None:
        raise NotFound(f"ACL policy {policy_id} not found")
    return json_response(policy_json(p), index=p.modify_index)


@bp.get("/v1/acl/policy/name/<name>")
def policy_read_by_name(name: str):
    _enabled()
    acl.require(acl.current().acl_read(), "acl:read")
    p = services().store.acl_policy(name=name)
    if p is None:
        raise NotFound(f"ACL policy {name!r} not found")
    return json_response(policy_json(p), index=p.modify_index)


@bp.put("/v1/acl/policy/<policy_id>")
def policy_update(policy_id: str):
    _enabled()
    acl.require(acl.current().acl_write(), "acl:write")
    pid = _uuid(policy_id, "policy ID")
    if pid == acl.MANAGEMENT_POLICY_ID:
        raise BadRequest("the global-management policy cannot be changed")
    body = json_body()
    if body.get("ID") and body["ID"] != pid:
        raise BadRequest("ID in the body does not match the URL")
    p = services().store.acl_policy_put(_policy_body(body, pid), create=False)
    if p is None:
        raise NotFound(f"ACL policy {policy_id} not found")
    return json_response(policy_json(p))


@bp.delete("/v1/acl/policy/<policy_id>")
def policy_delete(policy_id: str):
    _enabled()
    acl.require(acl.current().acl_write(), "acl:write")
    pid = _uuid(policy_id, "policy ID")
    if pid == acl.MANAGEMENT_POLICY_ID:
        raise BadRequest("the global-management policy cannot be deleted")
    if not services().store.acl_policy_delete(pid):
        raise NotFound(f"ACL policy {policy_id} not found")
    return json_response(True)


@bp.get("/v1/acl/policies")
def policy_list():
    _enabled()
    acl.require(acl.current().acl_read(), "acl:read")
    out = []
    for p in services().store.acl_policies():
        d = policy_json(p)
        del d["Rules"]  # the list shows no rules, as in Consul
        out.append(d)
    return json_response(out, index=services().store.topic_index("acl"))


# -- tokens --------------------------------------------------------------------------------------


def _policy_refs(body: dict) -> tuple[str, ...]:
    refs = body.get("Policies") or []
    if not isinstance(refs, list):
        raise BadRequest("Policies must be a list of {ID} or {Name} objects")
    store = services().store
    ids: list[str] = []
    for ref in refs:
        if not isinstance(ref, dict) or not (ref.get("ID") or ref.get("Name")):
            raise BadRequest("each entry of Policies needs an ID or a Name")
        if ref.get("ID"):
            p = store.acl_policy(policy_id=_uuid(ref["ID"], "Policies.ID"))
        else:
            if not isinstance(ref["Name"], str):
                raise BadRequest("Policies.Name must be a string")
            p = store.acl_policy(name=ref["Name"])
        if p is None:
            raise BadRequest(f"no such ACL policy: {ref.get('ID') or ref.get('Name')}")
        if p.id not in ids:
            ids.append(p.id)
    return tuple(ids)


def _token_body(body: dict) -> dict[str, Any]:
    unknown = set(body) - TOKEN_FIELDS - READ_ONLY
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "ExpirationTTL" in body:
        raise BadRequest("ExpirationTTL is not supported yet")
    desc = body.get("Description", "")
    if not isinstance(desc, str) or len(desc) > 512:
        raise BadRequest("Description must be a string of at most 512 characters")
    local = body.get("Local", False)
    if not isinstance(local, bool):
        raise BadRequest("Local must be true or false")
    return {"description": desc, "local": local, "policies": _policy_refs(body)}


@bp.put("/v1/acl/token")
def token_create():
    _enabled()
    acl.require(acl.current().acl_write(), "acl:write")
    body = json_body()
    fields = _token_body(body)
    accessor = (
        _uuid(body["AccessorID"], "AccessorID") if body.get("AccessorID") else str(uuid.uuid4())
    )
    secret = _uuid(body["SecretID"], "SecretID") if body.get("SecretID") else str(uuid.uuid4())
    t = services().store.acl_token_put(
        ACLToken(
            accessor_id=accessor,
            secret_hash=acl.hash_secret(secret),
            description=fields["description"],
            policies=fields["policies"],
            local=fields["local"],
            create_time=_now(),
        ),
        create=True,
    )
    assert t is not None
    return json_response(token_json(t, secret))


@bp.get("/v1/acl/token/self")
def token_self():
    _enabled()
    t = acl.current_token()
    if t is None:
        raise NotFound("ACL not found")
    return json_response(token_json(t))


@bp.get("/v1/acl/token/<accessor_id>")
def token_read(accessor_id: str):
    _enabled()
    acl.require(acl.current().acl_read(), "acl:read")
    t = services().store.acl_token(accessor_id=_uuid(accessor_id, "AccessorID"))
    if t is None:
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(token_json(t), index=t.modify_index)


@bp.put("/v1/acl/token/<accessor_id>")
def token_update(accessor_id: str):
    _enabled()
    acl.require(acl.current().acl_write(), "acl:write")
    aid = _uuid(accessor_id, "AccessorID")
    body = json_body()
    if body.get("AccessorID") and _uuid(body["AccessorID"], "AccessorID") != aid:
        raise BadRequest("AccessorID in the body does not match the URL")
    if body.get("SecretID"):
        raise BadRequest("a token's SecretID cannot be changed")
    fields = _token_body(body)
    t = services().store.acl_token_put(
        ACLToken(
            accessor_id=aid,
            secret_hash="",
            description=fields["description"],
            policies=fields["policies"],
            local=fields["local"],
        ),
        create=False,
    )
    if t is None:
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(token_json(t))


@bp.delete("/v1/acl/token/<accessor_id>")
def token_delete(accessor_id: str):
    _enabled()
    acl.require(acl.current().acl_write(), "acl:write")
    aid = _uuid(accessor_id, "AccessorID")
    if aid == acl.ANONYMOUS_ACCESSOR:
        raise BadRequest("the anonymous token cannot be deleted")
    if not services().store.acl_token_delete(aid):
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(True)


@bp.get("/v1/acl/tokens")
def token_list():
    _enabled()
    acl.require(acl.current().acl_read(), "acl:read")
    return json_response(
        [token_json(t) for t in services().store.acl_tokens()],
        index=services().store.topic_index("acl"),
    )
