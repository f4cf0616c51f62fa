"""``/v1/acl/*``: bootstrap, tokens and policies, in Consul's shapes.

Token secrets are shown once, when a token is made (bootstrap or create); the store keeps only
their SHA-256, so a later read cannot show them, and neither can a copy of the database.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint

from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, NotFound, PermissionDenied, TrellisError
from trellis.api.http import json_body, json_response, services
from trellis.api.schemas import load
from trellis.api.schemas.acl import PolicySchema, TokenSchema
from trellis.api.store.security import ACLPolicy, ACLToken

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
    if t.login is not None:  # a token made by acl/login (api/views/acl_login.py)
        out["AuthMethod"] = t.login.auth_method
        if t.login.expiration_time:
            out["ExpirationTime"] = t.login.expiration_time
        services_ = [{"ServiceName": n} for k, n in t.login.binds if k == "service"]
        nodes = [
            {"NodeName": n, "Datacenter": services().settings.datacenter}
            for k, n in t.login.binds
            if k == "node"
        ]
        if services_:
            out["ServiceIdentities"] = services_
        if nodes:
            out["NodeIdentities"] = nodes
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
    """The IDs of the policies a token body names (by ID or by name), each once, in order."""
    store = services().store
    ids: list[str] = []
    for link in links:
        if link["ID"]:
            p = store.acl_policy(policy_id=link["ID"])
        else:
            p = store.acl_policy(name=link["Name"])
        if p is None:
            raise BadRequest(f"no such ACL policy: {link['ID'] or link['Name']}")
        if p.id not in ids:
            ids.append(p.id)
    return tuple(ids)


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
    t = services().store.acl_token(accessor_id=_uuid(accessor_id, "AccessorID"))
    if t is None:
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(token_json(t), index=t.modify_index)


@bp.put("/v1/acl/token/<accessor_id>")
@needs("write")
def token_update(accessor_id: str):
    aid = _uuid(accessor_id, "AccessorID")
    body = load(TokenSchema, json_body())
    if body["AccessorID"] and body["AccessorID"] != aid:
        raise BadRequest("AccessorID in the body does not match the URL")
    if body["SecretID"]:
        raise BadRequest("a token's SecretID cannot be changed")
    t = services().store.acl_token_put(
        ACLToken(
            accessor_id=aid,
            secret_hash="",
            description=body["description"],
            policies=_policy_ids(body["policies"]),
            local=body["local"],
        ),
        create=False,
    )
    if t is None:
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(token_json(t))


@bp.delete("/v1/acl/token/<accessor_id>")
@needs("write")
def token_delete(accessor_id: str):
    aid = _uuid(accessor_id, "AccessorID")
    if aid == acl.ANONYMOUS_ACCESSOR:
        raise BadRequest("the anonymous token cannot be deleted")
    if not services().store.acl_token_delete(aid):
        raise NotFound(f"ACL token {accessor_id} not found")
    return json_response(True)


@bp.get("/v1/acl/tokens")
@needs("read")
def token_list():
    return json_response(
        [token_json(t) for t in services().store.acl_tokens()],
        index=services().store.topic_index("acl"),
    )
