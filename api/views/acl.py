"""``/v1/acl/*``: bootstrap, tokens, policies, roles and templated policies, in Consul's shapes.

Token secrets are shown once, when a token is made (bootstrap, create or clone); the store
keeps only their SHA-256, so a later read cannot show them, and neither can a copy of the
database. Consul shows ``SecretID`` on every read to a caller with ``acl:write``; Trellis
cannot, by design (README, "Access control").
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, request

from trellis.api.acl import identities as ids
from trellis.api.acl import service as acl
from trellis.api.acl.authorize import decide
from trellis.api.acl.rules import Authorizer
from trellis.api.errors import BadRequest, NotFound, PermissionDenied, TrellisError
from trellis.api.http import json_body, json_response, services
from trellis.api.schemas import load
from trellis.api.schemas.acl import (
    MAX_EXPIRATION_TTL,
    MIN_EXPIRATION_TTL,
    PolicySchema,
    RoleSchema,
    TemplateVariablesSchema,
    TokenCloneSchema,
    TokenSchema,
    identities_of,
)
from trellis.api.store.security import IDENTITY_KEYS, ACLPolicy, ACLRole, ACLToken
from trellis.api.views.catalog import check_dc

bp = Blueprint("acl", __name__)


class ACLDisabled(TrellisError):
    status = 401
    code = "acl_disabled"


def needs(permission: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every ACL endpoint: 401 when ACLs are off, then ``acl:read`` or ``acl:write`` (None:
    no permission, e.g. bootstrap and a token reading itself)."""

    def wrap(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if not services().settings.acl_enabled:
                raise ACLDisabled("ACL support disabled")
            if permission == "read":
                acl.require(acl.current().acl_read(), "acl:read")
            elif permission == "write":
                acl.require(acl.current().acl_write(), "acl:write")
            return view(*args, **kwargs)

        return guarded

    return wrap


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _links(ids_: tuple[str, ...], find: Callable[[str], Any]) -> list[dict[str, str]]:
    """``[{"ID", "Name"}]`` of the policies or roles that still exist (a deleted one is left
    out, as Consul does)."""
    out = []
    for i in ids_:
        o = find(i)
        if o is not None:
            out.append({"ID": o.id, "Name": o.name})
    return out


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
    out: dict[str, Any] = {
        "AccessorID": t.accessor_id,
        "Description": t.description,
        "Policies": _links(t.policies, lambda i: store.acl_policy(policy_id=i)),
        "Local": t.local,
        "CreateTime": t.create_time,
        "CreateIndex": t.create_index,
        "ModifyIndex": t.modify_index,
    }
    # Consul leaves these out when empty.
    roles = _links(t.roles, lambda i: store.acl_role(role_id=i))
    if roles:
        out["Roles"] = roles
    for key in IDENTITY_KEYS:
        if t.identities.get(key):
            out[key] = t.identities[key]
    if t.expires_at is not None:
        out["ExpirationTime"] = _rfc3339(t.expires_at)
    if t.login is not None:  # a token made by acl/login (api/views/acl_login.py)
        out["AuthMethod"] = t.login.auth_method
        if t.login.expiration_time and "ExpirationTime" not in out:
            out["ExpirationTime"] = t.login.expiration_time
        services_ = [{"ServiceName": n} for k, n in t.login.binds if k == "service"]
        nodes = [
            {"NodeName": n, "Datacenter": services().settings.datacenter}
            for k, n in t.login.binds
            if k == "node"
        ]
        if services_:
            out["ServiceIdentities"] = [*out.get("ServiceIdentities", ()), *services_]
        if nodes:
            out["NodeIdentities"] = [*out.get("NodeIdentities", ()), *nodes]
    if secret is not None:
        out["SecretID"] = secret
    return out


def role_json(r: ACLRole) -> dict[str, Any]:
    store = services().store
    out: dict[str, Any] = {
        "ID": r.id,
        "Name": r.name,
        "Description": r.description,
        "Policies": _links(r.policies, lambda i: store.acl_policy(policy_id=i)),
    }
    for key in IDENTITY_KEYS:
        if r.identities.get(key):
            out[key] = r.identities[key]
    out["CreateIndex"] = r.create_index
    out["ModifyIndex"] = r.modify_index
    return out


def _uuid(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"{what} {value!r} is not a UUID") from None


def _live_token(accessor_id: str) -> ACLToken:
    """The token with this accessor, unless it is gone or expired: then PermissionDenied
    "ACL not found", Consul's answer (its ``acl.ErrNotFound`` is a 403, not a 404). The
    caller named a token that is not one: the caller's fault."""
    t = services().store.acl_token(accessor_id=_accessor(accessor_id))
    if t is None or _expired(t, time.time()):
        raise PermissionDenied("ACL not found")
    return t


def _expired(t: ACLToken, now: float) -> bool:
    return t.expires_at is not None and t.expires_at <= now


def _accessor(value: str) -> str:
    """A token's AccessorID from the path: checked, and kept in the case it was given (the
    store's lookups ignore case, as Consul's accessor index does)."""
    _uuid(value, "AccessorID")
    return value


@bp.put("/v1/acl/bootstrap")
@needs(None)
def bootstrap():
    secret = str(uuid.uuid4())
    token = acl.bootstrap(secret)
    if token is None:
        raise PermissionDenied("ACL bootstrap no longer allowed")
    return json_response(token_json(token, secret))


# -- policies ------------------------------------------------------------------------------------


def _policy(body: dict[str, Any], policy_id: str) -> ACLPolicy:
    return ACLPolicy(
        id=policy_id,
        name=body["name"],
        description=body["description"],
        rules=body["rules"],
        datacenters=body["datacenters"],
    )


@bp.put("/v1/acl/policy")
@needs("write")
def policy_create():
    body = load(PolicySchema, json_body())
    if body["ID"]:
        raise BadRequest("ID is assigned by the server on create")
    p = services().store.acl_policy_put(_policy(body, str(uuid.uuid4())), create=True)
    return json_response(policy_json(p))


@bp.get("/v1/acl/policy/<policy_id>")
@needs("read")
def policy_read(policy_id: str):
    p = services().store.acl_policy(policy_id=_uuid(policy_id, "policy ID"))
    if p is None:
        raise NotFound(f"ACL policy {policy_id} not found")
    return json_response(policy_json(p), index=p.modify_index)


@bp.get("/v1/acl/policy/name/<name>")
@needs("read")
def policy_read_by_name(name: str):
    p = services().store.acl_policy(name=name)
    if p is None:
        raise NotFound(f"ACL policy {name!r} not found")
    return json_response(policy_json(p), index=p.modify_index)


@bp.put("/v1/acl/policy/<policy_id>")
@needs("write")
def policy_update(policy_id: str):
    pid = _uuid(policy_id, "policy ID")
    if pid == acl.MANAGEMENT_POLICY_ID:
        raise BadRequest("the global-management policy cannot be changed")
    body = load(PolicySchema, json_body())
    if body["ID"] and body["ID"] != pid:
        raise BadRequest("ID in the body does not match the URL")
    p = services().store.acl_policy_put(_policy(body, pid), create=False)
    if p is None:
        raise NotFound(f"ACL policy {policy_id} not found")
    return json_response(policy_json(p))


@bp.delete("/v1/acl/policy/<policy_id>")
@needs("write")
def policy_delete(policy_id: str):
    pid = _uuid(policy_id, "policy ID")
    if pid == acl.MANAGEMENT_POLICY_ID:
        raise BadRequest("the global-management policy cannot be deleted")
    if not services().store.acl_policy_delete(pid):
        raise NotFound(f"ACL policy {policy_id} not found")
    return json_response(True)


@bp.get("/v1/acl/policies")
@needs("read")
def policy_list():
    out = []
    for p in services().store.acl_policies():
        d = policy_json(p)
        del d["Rules"]  # the list shows no rules, as in Consul
        out.append(d)
    return json_response(out, index=services().store.topic_index("acl"))


# -- tokens --------------------------------------------------------------------------------------


def _policy_ids(links: list[dict[str, Any]]) -> tuple[str, ...]:
    """The IDs of the policies a body names (by ID or by name), each once, in order."""
    store = services().store
    return _link_ids(
        links,
        "policy",
        lambda i: store.acl_policy(policy_id=i),
        lambda n: store.acl_policy(name=n),
    )


def _role_ids(links: list[dict[str, Any]]) -> tuple[str, ...]:
    """The IDs of the roles a token body names (by ID or by name), each once, in order."""
    store = services().store
    return _link_ids(
        links, "role", lambda i: store.acl_role(role_id=i), lambda n: store.acl_role(name=n)
    )


def _link_ids(
    links: list[dict[str, Any]],
    what: str,
    by_id: Callable[[str], Any],
    by_name: Callable[[str], Any],
) -> tuple[str, ...]:
    ids_: list[str] = []
    for link in links:
        o = by_id(link["ID"]) if link["ID"] else by_name(link["Name"])
        if o is None:
            raise BadRequest(f"no such ACL {what}: {link['ID'] or link['Name']}")
        if o.id not in ids_:
            ids_.append(o.id)
    return tuple(ids_)


def _expiry(body: dict[str, Any], now: float) -> float | None:
    """When a new token stops working (None: never). BadRequest for a time in the past or
    outside Consul's bounds (1m to 24h from now): the client's fault."""
    if body["ExpirationTTL"]:
        return now + body["ExpirationTTL"]
    at = body["ExpirationTime"]
    if at is None:
        return None
    if at <= now:
        raise BadRequest("ExpirationTime cannot be in the past")
    if not MIN_EXPIRATION_TTL <= at - now <= MAX_EXPIRATION_TTL:
        raise BadRequest("ExpirationTime must be between 1m and 24h from now")
    return at


@bp.put("/v1/acl/token")
@needs("write")
def token_create():
    body = load(TokenSchema, json_body())
    secret = body["SecretID"] or str(uuid.uuid4())
    t = services().store.acl_token_put(
        ACLToken(
            accessor_id=body["AccessorID"] or str(uuid.uuid4()),
            secret_hash=acl.hash_secret(secret),
            description=body["description"],
            policies=_policy_ids(body["policies"]),
            local=body["local"],
            create_time=_now(),
            roles=_role_ids(body["Roles"]),
            identities=identities_of(body),
            expires_at=_expiry(body, time.time()),
        ),
        create=True,
    )
    assert t is not None
    return json_response(token_json(t, secret))


@bp.get("/v1/acl/token/self")
@needs(None)
def token_self():
    t = acl.current_token()
    if t is None:
        raise NotFound("ACL not found")
    return json_response(token_json(t))


@bp.get("/v1/acl/token/<accessor_id>")
@needs("read")
def token_read(accessor_id: str):
    t = _live_token(accessor_id)
    return json_response(token_json(t), index=t.modify_index)


@bp.put("/v1/acl/token/<accessor_id>")
@needs("write")
def token_update(accessor_id: str):
    aid = _accessor(accessor_id)
    body = load(TokenSchema, json_body())
    if body["AccessorID"] and body["AccessorID"].lower() != aid.lower():
        raise BadRequest("AccessorID in the body does not match the URL")
    store = services().store
    cur = store.acl_token(accessor_id=aid)
    if cur is None:
        raise NotFound(f"ACL token {accessor_id} not found")
    # Consul's Go client sends the whole token back, its secret included: the same secret
    # is fine (compared by hash, all the store has), another is refused.
    if body["SecretID"] and acl.hash_secret(body["SecretID"]) != cur.secret_hash:
        raise BadRequest("a token's SecretID cannot be changed")
    # Consul refuses to change a token's expiry; sending the one it has back is fine.
    if body["ExpirationTTL"] or (
        body["ExpirationTime"] is not None
        and (cur.expires_at is None or abs(body["ExpirationTime"] - cur.expires_at) > 1e-3)
    ):
        raise BadRequest("a token's expiration cannot be changed")
    t = store.acl_token_put(
        ACLToken(
            accessor_id=aid,
            secret_hash="",
            description=body["description"],
            policies=_policy_ids(body["policies"]),
            local=body["local"],
            roles=_role_ids(body["Roles"]),
            identities=identities_of(body),
        ),
        create=False,
    )
    if t is None:
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(token_json(t))


@bp.put("/v1/acl/token/<accessor_id>/clone")
@needs("write")
def token_clone(accessor_id: str):
    """A new token (new AccessorID and SecretID) with the original's policies, roles,
    identities, locality and expiry; ``Description`` from the body, else the original's."""
    src = _live_token(accessor_id)
    if src.accessor_id == acl.ANONYMOUS_ACCESSOR:
        # Consul refuses this too: a copy of the anonymous token would be a second one.
        raise BadRequest("the anonymous token cannot be cloned")
    body = load(TokenCloneSchema, json_body(required=False) or {})
    description = src.description if body["Description"] is None else body["Description"]
    secret = str(uuid.uuid4())
    t = services().store.acl_token_put(
        ACLToken(
            accessor_id=str(uuid.uuid4()),
            secret_hash=acl.hash_secret(secret),
            description=description,
            policies=src.policies,
            local=src.local,
            create_time=_now(),
            roles=src.roles,
            identities=src.identities,
            expires_at=src.expires_at,
        ),
        create=True,
    )
    assert t is not None
    return json_response(token_json(t, secret))


@bp.delete("/v1/acl/token/<accessor_id>")
@needs("write")
def token_delete(accessor_id: str):
    aid = _accessor(accessor_id)
    if aid.lower() == acl.ANONYMOUS_ACCESSOR:
        raise BadRequest("the anonymous token cannot be deleted")
    if not services().store.acl_token_delete(aid):
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(True)


@bp.get("/v1/acl/tokens")
@needs("read")
def token_list():
    """Every live token, or those holding ``?policy=`` (an ID), ``?role=`` (an ID) or a
    service identity for ``?servicename=``, as Consul filters them. Expired tokens the reaper
    has not deleted yet are left out, as Consul does."""
    policy = request.args.get("policy")
    role = request.args.get("role")
    service = request.args.get("servicename")
    now = time.time()
    out = []
    for t in services().store.acl_tokens():
        if _expired(t, now):
            continue
        if policy and policy not in t.policies:
            continue
        if role and role not in t.roles:
            continue
        if service and all(
            i.get("ServiceName") != service for i in t.identities.get("ServiceIdentities", ())
        ):
            continue
        out.append(token_json(t))
    return json_response(out, index=services().store.topic_index("acl"))


# -- roles ---------------------------------------------------------------------------------------


def _role(body: dict[str, Any], role_id: str) -> ACLRole:
    return ACLRole(
        id=role_id,
        name=body["Name"],
        description=body["Description"],
        policies=_policy_ids(body["Policies"]),
        identities=identities_of(body),
    )


@bp.put("/v1/acl/role")
@needs("write")
def role_create():
    body = load(RoleSchema, json_body())
    if body["ID"]:
        raise BadRequest("ID is assigned by the server on create")
    r = services().store.acl_role_put(_role(body, str(uuid.uuid4())), create=True)
    assert r is not None
    return json_response(role_json(r))


@bp.get("/v1/acl/role/<role_id>")
@needs("read")
def role_read(role_id: str):
    r = services().store.acl_role(role_id=_uuid(role_id, "role ID"))
    if r is None:
        raise NotFound(f"ACL role {role_id} not found")
    return json_response(role_json(r), index=r.modify_index)


@bp.get("/v1/acl/role/name/<name>")
@needs("read")
def role_read_by_name(name: str):
    r = services().store.acl_role(name=name)
    if r is None:
        raise NotFound(f"ACL role {name!r} not found")
    return json_response(role_json(r), index=r.modify_index)


@bp.put("/v1/acl/role/<role_id>")
@needs("write")
def role_update(role_id: str):
    rid = _uuid(role_id, "role ID")
    body = load(RoleSchema, json_body())
    if body["ID"] and body["ID"] != rid:
        raise BadRequest("ID in the body does not match the URL")
    r = services().store.acl_role_put(_role(body, rid), create=False)
    if r is None:
        raise NotFound(f"ACL role {role_id} not found")
    return json_response(role_json(r))


@bp.delete("/v1/acl/role/<role_id>")
@needs("write")
def role_delete(role_id: str):
    if not services().store.acl_role_delete(_uuid(role_id, "role ID")):
        raise NotFound(f"ACL role {role_id} not found")
    return json_response(True)


@bp.get("/v1/acl/roles")
@needs("read")
def role_list():
    """Every role, or those holding the policy ``?policy=`` (an ID)."""
    policy = request.args.get("policy")
    out = [role_json(r) for r in services().store.acl_roles() if not policy or policy in r.policies]
    return json_response(out, index=services().store.topic_index("acl"))


# -- templated policies --------------------------------------------------------------------------


def _template_json(t: ids.Template) -> dict[str, Any]:
    return {
        "TemplateName": t.name,
        "Schema": ids.NAME_SCHEMA if t.needs_name else "",
        "Template": t.shown,
        "Description": t.description,
    }


@bp.get("/v1/acl/templated-policies")
@needs("read")
def templated_policy_list():
    return json_response({name: _template_json(t) for name, t in ids.TEMPLATES.items()})


@bp.get("/v1/acl/templated-policy/name/<path:name>")
@needs("read")
def templated_policy_read(name: str):
    t = ids.TEMPLATES.get(name)
    if t is None:
        raise NotFound(f"no such templated policy: {name!r}")
    return json_response(_template_json(t))


@bp.post("/v1/acl/templated-policy/preview/<path:name>")
@needs("read")
def templated_policy_preview(name: str):
    """The policy a templated policy renders to with the body's variables (``{"Name": ...}``)."""
    if name not in ids.TEMPLATES:
        raise NotFound(f"no such templated policy: {name!r}")
    variables = load(TemplateVariablesSchema, json_body(required=False) or {})
    try:
        rules = ids.templated_rules(name, {k: v for k, v in variables.items() if v is not None})
    except ids.IdentityError as e:
        raise BadRequest(str(e)) from None
    return json_response(
        {
            "ID": "",
            "Name": "synthetic-policy-preview",
            "Description": f"synthetic policy generated from templated policy: {name}",
            "Rules": rules,
            "Datacenters": [],
        }
    )


@bp.post("/v1/internal/acl/authorize")
@needs(None)
def authorize():
    """Consul's internal authorization endpoint (trellis.api.acl.authorize): what the
    request's token may do, asked of the same Authorizer every endpoint asks. Any token may
    ask about itself; ACLs off is the 401 every ACL endpoint gives (the node agent reads it as
    "everything is allowed"). A bad body is the caller's 400; an unknown token the 403 of
    any request."""
    check_dc()
    body = json_body(allow_list=True)
    decide(Authorizer.allow_all(), body)  # a bad body is a 400 before the token is resolved
    return json_response(decide(acl.current(), body))
