"""ACLs at the HTTP boundary: who is asking (the token), and what may they do (an Authorizer).

The token comes from ``X-Consul-Token`` or ``Authorization: Bearer``; no token means the
anonymous token. Secrets are compared by SHA-256 (they are random UUIDs, so a plain hash is
enough) and never logged. Authorizers are cached per token in each process and dropped when
any ACL object changes (the change feed says so).

With ACLs off (``trellis dev``), every request gets ``Authorizer.allow_all()``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from flask import g, request

from trellis.api.acl.rules import Authorizer, RulesError, parse_rules
from trellis.api.errors import PermissionDenied
from trellis.api.http import services
from trellis.api.store.errors import StoreConflict
from trellis.api.store.security import ACLPolicy, ACLToken

MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_NAME = "global-management"
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"  # noqa: S105 - Consul's well-known anonymous token, not a secret
BOOTSTRAP_DOC = "acl/bootstrap"
#: ACLs off: one immutable allow-all Authorizer for every request (it used to be built per
#: request, which showed in profiles of a thousand woken blocking queries).
_ALLOW_ALL = Authorizer.allow_all()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def request_secret() -> str | None:
    """The token the request carries, if any (Consul's header, or a bearer token)."""
    token = request.headers.get("X-Consul-Token")
    if token:
        return token.strip()
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def require(allowed: bool, permission: str) -> None:
    """Refuse with Consul's 403 unless ``allowed``; nothing has changed yet when this runs."""
    if not allowed:
        raise PermissionDenied(f"Permission denied: token lacks permission '{permission}'")


class AuthorizerCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pos = -1
        self._by_hash: dict[str, tuple[ACLToken | None, Authorizer]] = {}

    def resolve(self, secret: str | None) -> tuple[ACLToken | None, Authorizer]:
        svc = services()
        feed = svc.store.feed
        if self._pos < 0 or feed.topic_changed_since("acl", self._pos):
            with self._lock:
                self._by_hash = {}
                self._pos = feed.position()
        h = hash_secret(secret if secret is not None else ANONYMOUS_SECRET)
        hit = self._by_hash.get(h)
        if hit is not None:
            return hit
        store = svc.store
        token = store.acl_token(secret_hash=h)
        if token is None:
            if secret is None:
                # No anonymous token yet (ACLs just enabled): the default policy alone.
                result: tuple[ACLToken | None, Authorizer] = (
                    None,
                    Authorizer((), default_allow=_default_allow()),
                )
                self._by_hash[h] = result
                return result
            raise PermissionDenied("ACL not found")
        if MANAGEMENT_POLICY_ID in token.policies:
            result = (token, Authorizer.management())
        else:
            rules = []
            broken = False
            for pid in token.policies:
                p = store.acl_policy(policy_id=pid)
                if p is None:
                    continue  # a deleted policy grants nothing
                try:
                    rules.append(parse_rules(p.rules))
                except RulesError:
                    # Rules are checked on write, so this is a damaged store. Skipping the
                    # policy would drop its denies and grant more; deny everything instead.
                    broken = True
            if broken:
                result = (token, Authorizer((), default_allow=False))
            else:
                result = (token, Authorizer(rules, default_allow=_default_allow()))
        if len(self._by_hash) > 10_000:
            self._by_hash = {}
        self._by_hash[h] = result
        return result


def dns_authorizer(app: Any) -> Callable[[], Authorizer | None] | None:
    """The rules DNS answers under, for ``trellis.api.dns``: None with ACLs off; otherwise those of
    the anonymous token (DNS carries no token; Consul's DNS uses the agent's default token, which
    is the anonymous one unless set). Resolved per query through the per-process cache, so a
    policy change reaches DNS as soon as the change feed has it."""
    if not app.extensions["trellis"].settings.acl_enabled:
        return None

    def authorizer() -> Authorizer:
        with app.app_context():
            return app.extensions["trellis"].acls.resolve(None)[1]

    return authorizer


def _default_allow() -> bool:
    return services().settings.acl_default_policy == "allow"


def _resolve() -> tuple[ACLToken | None, Authorizer]:
    if "trellis_acl" not in g:
        if not services().settings.acl_enabled:
            g.trellis_acl = (None, _ALLOW_ALL)
        else:
            g.trellis_acl = services().acls.resolve(request_secret())
    return g.trellis_acl


def current() -> Authorizer:
    """The Authorizer of the request's token (PermissionDenied for an unknown token)."""
    return _resolve()[1]


def current_token() -> ACLToken | None:
    return _resolve()[0]


def ensure_builtins() -> None:
    """The global-management policy and the anonymous token exist once ACLs are on.

    Every worker (and replica) runs this at start, so another may create them between the
    read and the write here: that StoreConflict is harmless and ignored. Anything else (the
    store is down: StoreUnavailable, a 503) is the caller's to report; it used to be
    swallowed, and a server then ran without the objects it had just claimed to ensure.
    """
    store = services().store
    if store.acl_policy(policy_id=MANAGEMENT_POLICY_ID) is None:
        try:
            store.acl_policy_put(
                ACLPolicy(
                    id=MANAGEMENT_POLICY_ID,
                    name=MANAGEMENT_POLICY_NAME,
                    description="Builtin Policy that grants unlimited access",
                    rules="",
                ),
                create=True,
            )
        except StoreConflict:
            pass  # another worker made it first
    if store.acl_token(accessor_id=ANONYMOUS_ACCESSOR) is None:
        try:
            store.acl_token_put(
                ACLToken(
                    accessor_id=ANONYMOUS_ACCESSOR,
                    secret_hash=hash_secret(ANONYMOUS_SECRET),
                    description="Anonymous Token",
                ),
                create=True,
            )
        except StoreConflict:
            pass  # another worker made it first


def bootstrap(secret: str) -> ACLToken | None:
    """Make the first management token, once per cluster (compare-and-set decides)."""
    import datetime as dt
    import uuid

    ensure_builtins()
    store = services().store
    accessor = str(uuid.uuid4())
    if (
        store.system_write({BOOTSTRAP_DOC: {"AccessorID": accessor}}, expect={BOOTSTRAP_DOC: 0})
        is None
    ):
        return None
    return store.acl_token_put(
        ACLToken(
            accessor_id=accessor,
            secret_hash=hash_secret(secret),
            description="Bootstrap Token (Global Management)",
            policies=(MANAGEMENT_POLICY_ID,),
            create_time=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        ),
        create=True,
    )


def require_service_write(name: str) -> None:
    require(current().service_write(name), f"service:write on {name!r}")


def require_registration(service_name: str, destination: str | None) -> None:
    """Registering a service needs ``service:write`` on it; registering a proxy also needs it
    on the service it proxies for, or a token could intercept that service's traffic
    (CVE-2021-38698)."""
    require_service_write(service_name)
    if destination:
        require_service_write(destination)


def require_node_write(node: str) -> None:
    require(current().node_write(node), f"node:write on {node!r}")


def require_operator(write: bool) -> None:
    a = current()
    require(
        a.operator_write() if write else a.operator_read(),
        "operator:" + ("write" if write else "read"),
    )
