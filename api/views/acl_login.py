"""``/v1/acl/auth-method*``, ``/v1/acl/binding-rule*``, ``/v1/acl/login`` and ``logout``.

A workload trades a JWT signed by an issuer the operator trusts for a Trellis token: the auth
method says which keys and claims to trust (``trellis.api.acl.jwtauth``), its binding rules say
what a login whose claims match a ``Selector`` is bound to: a service identity
(``BindType: service``), a node identity (``node``) or an existing policy (``policy``, by
name; one that does not exist at login time binds nothing, as in Consul). Identities are kept
on the token as data (``TokenLogin.binds``) and turned into rules by the ACL cache. Roles and
templated policies are not bindable here (``role``/``templated-policy`` are refused with a 400
that says so).

A login token lives at most the method's ``MaxTokenTTL`` (``ExpirationTime``, enforced on every
resolve) and may ``logout`` (delete itself); no other token may.

Who is at fault: a bad body or configuration is the writer's (400); a bearer token that does
not verify, or that no rule binds, is the caller's (403, as Consul answers).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from typing import Any

from flask import Blueprint, request

from trellis.api.acl import service as acl
from trellis.api.acl.jwtauth import (
    AuthMethodError,
    JWTConfig,
    LoginError,
    check_bind_name,
    check_selector,
    interpolate,
    jwks_keys,
)
from trellis.api.errors import BadRequest, NotFound, PermissionDenied
from trellis.api.http import json_body, json_response, services
from trellis.api.store.logins import AuthMethod, BindingRule
from trellis.api.store.security import ACLToken, TokenLogin
from trellis.api.views.acl import ACLDisabled, needs, token_json
from trellis.proxy.durations import DurationError, format_duration, parse_duration

bp = Blueprint("acl_login", __name__)

NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: Consul's service names as a service identity holds them, and node names.
SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
BIND_TYPES = ("service", "node", "policy")
NOT_YET = ("role", "templated-policy")
#: Consul's bounds on a token's lifetime (acl token_min/max_expiration_ttl defaults).
MIN_TTL, MAX_TTL = 60.0, 24 * 3600.0
METHOD_FIELDS = {
    "Name",
    "Type",
    "DisplayName",
    "Description",
    "MaxTokenTTL",
    "TokenLocality",
    "Config",
    "Namespace",
    "Partition",
    "CreateIndex",
    "ModifyIndex",
    "NamespaceRules",
}
RULE_FIELDS = {
    "ID",
    "Description",
    "AuthMethod",
    "Selector",
    "BindType",
    "BindName",
    "BindVars",
    "Namespace",
    "Partition",
    "CreateIndex",
    "ModifyIndex",
}


def _object(body: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    return body


def _str(body: dict[str, Any], key: str, default: str = "") -> str:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise BadRequest(f"{key} must be a string")
    return v


# -- auth methods ----------------------------------------------------------------------------------


def _ttl(v: Any) -> float:
    """``MaxTokenTTL``: a Go duration string, or a number of nanoseconds (Go's JSON form)."""
    if v is None or v == "" or v == 0:
        return 0.0
    if isinstance(v, bool):
        raise BadRequest("MaxTokenTTL must be a duration")
    try:
        secs = v / 1e9 if isinstance(v, (int, float)) else parse_duration(str(v))
    except DurationError:
        raise BadRequest(f"MaxTokenTTL {v!r} is not a duration") from None
    if not MIN_TTL <= secs <= MAX_TTL:
        raise BadRequest("MaxTokenTTL must be between 1m and 24h")
    return secs


def read_jwks(path: str) -> Any:
    """The keys of a JWKS file (``Config.JWKSFile``); read on write and on every login, so a
    rotated file is used at once. BadRequest if unreadable: the method's writer named it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise BadRequest(f"Config.JWKSFile cannot be read: {e.strerror}") from None
    try:
        return jwks_keys(text)
    except AuthMethodError as e:
        raise BadRequest(f"Config.JWKSFile: {e}") from None


def _parse_config(config: Any) -> JWTConfig:
    try:
        cfg = JWTConfig.parse(config)
    except AuthMethodError as e:
        raise BadRequest(str(e)) from None
    if cfg.jwks_file:
        read_jwks(cfg.jwks_file)
    return cfg


def _method(body: Any, name: str | None) -> AuthMethod:
    b = _object(body, METHOD_FIELDS)
    given = _str(b, "Name")
    if name is not None and given and given != name:
        raise BadRequest("Name in the body does not match the URL")
    name = name or given
    if not NAME.match(name):
        raise BadRequest("Name must be 1-128 letters, digits, '-' or '_'")
    kind = _str(b, "Type")
    if kind != "jwt":
        raise BadRequest(f"Type {kind!r} is not supported (Trellis has the 'jwt' auth method)")
    locality = _str(b, "TokenLocality")
    if locality not in ("", "local", "global"):
        raise BadRequest("TokenLocality must be 'local' or 'global'")
    config = b.get("Config") or {}
    _parse_config(config)
    return AuthMethod(
        name=name,
        type=kind,
        display_name=_str(b, "DisplayName"),
        description=_str(b, "Description"),
        max_token_ttl=_ttl(b.get("MaxTokenTTL")),
        token_locality=locality,
        config=dict(config),
    )


def method_json(m: AuthMethod, *, config: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Name": m.name,
        "Type": m.type,
        "DisplayName": m.display_name,
        "Description": m.description,
        "MaxTokenTTL": format_duration(m.max_token_ttl),
        "TokenLocality": m.token_locality,
    }
    if config:
        out["Config"] = m.config
    out["CreateIndex"] = m.create_index
    out["ModifyIndex"] = m.modify_index
    return out


@bp.put("/v1/acl/auth-method")
@needs("write")
def method_create():
    m = services().store.acl_auth_method_put(_method(json_body(), None), create=True)
    assert m is not None
    return json_response(method_json(m))


@bp.get("/v1/acl/auth-method/<name>")
@needs("read")
def method_read(name: str):
    m = services().store.acl_auth_method(name)
    if m is None:
        raise NotFound(f"ACL auth method {name!r} not found")
    return json_response(method_json(m), index=m.modify_index)


@bp.put("/v1/acl/auth-method/<name>")
@needs("write")
def method_update(name: str):
    m = services().store.acl_auth_method_put(_method(json_body(), name), create=False)
    if m is None:
        raise NotFound(f"ACL auth method {name!r} not found")
    return json_response(method_json(m))


@bp.delete("/v1/acl/auth-method/<name>")
@needs("write")
def method_delete(name: str):
    # Consul answers true for a method that is not there: deleting is idempotent.
    services().store.acl_auth_method_delete(name)
    return json_response(True)


@bp.get("/v1/acl/auth-methods")
@needs("read")
def method_list():
    return json_response(
        [method_json(m, config=False) for m in services().store.acl_auth_methods()],
        index=services().store.topic_index("acl"),
    )


# -- binding rules ------------------------------------------------------------------------------


def _rule(body: Any, rule_id: str | None) -> BindingRule:
    b = _object(body, RULE_FIELDS)
    given = b.get("ID") or ""
    if rule_id is None and given:
        raise BadRequest("ID is assigned by the server on create")
    if rule_id is not None and given and given != rule_id:
        raise BadRequest("ID in the body does not match the URL")
    method_name = _str(b, "AuthMethod")
    if rule_id is not None and not method_name:
        old = services().store.acl_binding_rule(rule_id)
        method_name = old.auth_method if old is not None else ""
    if not method_name:
        raise BadRequest("AuthMethod is required")
    method = services().store.acl_auth_method(method_name)
    if method is None:
        raise BadRequest(f"no auth method named {method_name!r}")
    bind_type = _str(b, "BindType")
    if bind_type in NOT_YET:
        raise BadRequest(f"BindType {bind_type!r} is not supported by Trellis yet")
    if bind_type not in BIND_TYPES:
        raise BadRequest(f"BindType must be one of {', '.join(BIND_TYPES)}")
    bind_name = _str(b, "BindName")
    selector = _str(b, "Selector")
    try:
        variables = _parse_config(method.config).variables()
        check_bind_name(bind_name, variables[0])
        check_selector(selector, variables)
    except AuthMethodError as e:
        raise BadRequest(str(e)) from None
    if "${" not in bind_name:
        _check_bound_name(bind_type, bind_name, BadRequest)
    return BindingRule(
        id=rule_id or str(uuid.uuid4()),
        auth_method=method_name,
        description=_str(b, "Description"),
        selector=selector,
        bind_type=bind_type,
        bind_name=bind_name,
    )


def _check_bound_name(bind_type: str, name: str, error: type[Exception]) -> None:
    pattern = {"service": SERVICE_NAME, "node": NODE_NAME, "policy": NAME}[bind_type]
    if len(name) > 256 or not pattern.match(name):
        raise error(f"BindName {name!r} is not a valid {bind_type} name")


def rule_json(b: BindingRule) -> dict[str, Any]:
    return {
        "ID": b.id,
        "Description": b.description,
        "AuthMethod": b.auth_method,
        "Selector": b.selector,
        "BindType": b.bind_type,
        "BindName": b.bind_name,
        "CreateIndex": b.create_index,
        "ModifyIndex": b.modify_index,
    }


def _rule_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"binding rule ID {value!r} is not a UUID") from None


@bp.put("/v1/acl/binding-rule")
@needs("write")
def rule_create():
    b = services().store.acl_binding_rule_put(_rule(json_body(), None), create=True)
    assert b is not None
    return json_response(rule_json(b))


@bp.get("/v1/acl/binding-rule/<rule_id>")
@needs("read")
def rule_read(rule_id: str):
    b = services().store.acl_binding_rule(_rule_id(rule_id))
    if b is None:
        raise NotFound(f"ACL binding rule {rule_id} not found")
    return json_response(rule_json(b), index=b.modify_index)


@bp.put("/v1/acl/binding-rule/<rule_id>")
@needs("write")
def rule_update(rule_id: str):
    rid = _rule_id(rule_id)
    if services().store.acl_binding_rule(rid) is None:
        raise NotFound(f"ACL binding rule {rule_id} not found")
    b = services().store.acl_binding_rule_put(_rule(json_body(), rid), create=False)
    if b is None:
        raise NotFound(f"ACL binding rule {rule_id} not found")
    return json_response(rule_json(b))


@bp.delete("/v1/acl/binding-rule/<rule_id>")
@needs("write")
def rule_delete(rule_id: str):
    services().store.acl_binding_rule_delete(_rule_id(rule_id))
    return json_response(True)


@bp.get("/v1/acl/binding-rules")
@needs("read")
def rule_list():
    method = request.args.get("authmethod") or None
    return json_response(
        [rule_json(b) for b in services().store.acl_binding_rules(method)],
        index=services().store.topic_index("acl"),
    )


# -- login and logout ----------------------------------------------------------------------------


def _bind(method: AuthMethod, variables: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """The policy IDs and identities the method's rules bind for a login with ``variables``."""
    store = services().store
    policies: list[str] = []
    binds: list[tuple[str, str]] = []
    for rule in store.acl_binding_rules(method.name):
        try:
            selector = check_selector(rule.selector)
        except AuthMethodError:
            continue  # checked on write; a damaged rule binds nothing
        if selector is not None and not selector(variables):
            continue
        try:
            name = interpolate(rule.bind_name, variables)
        except LoginError:
            continue  # the claim it names is absent from this login: nothing to bind
        _check_bound_name(rule.bind_type, name, PermissionDenied)
        if rule.bind_type == "policy":
            p = store.acl_policy(name=name)
            if p is not None and p.id not in policies:
                policies.append(p.id)
        elif (rule.bind_type, name) not in binds:
            binds.append((rule.bind_type, name))
    return policies, binds


@bp.route("/v1/acl/login", methods=["POST", "PUT"])
def login():
    if not services().settings.acl_enabled:
        raise ACLDisabled("ACL support disabled")
    b = _object(json_body(), {"AuthMethod", "BearerToken", "Meta", "Token"})
    name = _str(b, "AuthMethod")
    bearer = b.get("BearerToken")
    meta = b.get("Meta") or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise BadRequest("Meta must be an object of strings")
    if not name or not bearer:
        raise BadRequest("AuthMethod and BearerToken are required")
    method = services().store.acl_auth_method(name)
    if method is None:
        raise PermissionDenied(f"ACL not found: auth method {name!r} does not exist")
    try:
        cfg = JWTConfig.parse(method.config)
    except AuthMethodError:
        raise PermissionDenied("the auth method's configuration is no longer valid") from None
    keys = list(read_jwks(cfg.jwks_file)) if cfg.jwks_file else list(cfg.pem_keys)
    now = time.time()
    try:
        claims = cfg.verify(bearer, keys, now)
        variables = cfg.map_claims(claims)
    except LoginError as e:
        raise PermissionDenied(f"Permission denied: {e}") from None
    policies, binds = _bind(method, variables)
    if not policies and not binds:
        raise PermissionDenied("Permission denied: no binding rule matches this login")
    created = dt.datetime.fromtimestamp(now, dt.UTC)
    expires_at = now + method.max_token_ttl if method.max_token_ttl else None
    secret = str(uuid.uuid4())
    description = "token created via login"
    if meta:
        description += ": " + json.dumps(meta, sort_keys=True)
    token = services().store.acl_login_token_put(
        ACLToken(
            accessor_id=str(uuid.uuid4()),
            secret_hash=acl.hash_secret(secret),
            description=description,
            policies=tuple(policies),
            local=method.token_locality == "local",  # noqa: S105 - not a secret
            create_time=created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        ),
        TokenLogin(
            auth_method=method.name,
            expiration_time=(
                ""
                if expires_at is None
                else dt.datetime.fromtimestamp(expires_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ),
            expires_at=expires_at,
            binds=tuple(binds),
        ),
    )
    return json_response(token_json(token, secret))


@bp.route("/v1/acl/logout", methods=["POST", "PUT"])
@needs(None)
def logout():
    t = acl.current_token()
    if t is None or t.login is None:
        raise PermissionDenied("Permission denied: only a token made by login may log out")
    services().store.acl_token_delete(t.accessor_id)
    return json_response(True)
