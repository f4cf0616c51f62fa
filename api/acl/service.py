"""ACLs at the HTTP boundary: who is asking (the token), and what may they do (an Authorizer).

The token comes from ``X-Consul-Token``, else ``Authorization: Bearer``, else the query
parameter ``?token=`` (Consul's order); no token means the anonymous token. Secrets are
compared by SHA-256 (they are random UUIDs, so a plain hash is enough) and never logged.
Authorizers come from the per-process ``AuthorizerCache`` (``trellis.api.acl.cache``), which
never answers from a state older than the request: each request reads the store's ACL and
intention indexes once, when it first needs them (``fresh_indexes``), and the caches compare
their contents with that.

With ACLs off (``trellis dev``), every request gets ``Authorizer.allow_all()``.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import g, request

from trellis.api.acl.cache import ANONYMOUS_SECRET, MANAGEMENT_POLICY_ID, hash_secret
from trellis.api.acl.rules import Authorizer
from trellis.api.errors import PermissionDenied
from trellis.api.http import services
from trellis.api.store.errors import StoreConflict
from trellis.api.store.security import ACLPolicy, ACLToken

MANAGEMENT_POLICY_NAME = "global-management"
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
BOOTSTRAP_DOC = "acl/bootstrap"
#: ACLs off: one immutable allow-all Authorizer for every request (it used to be built per
#: request, which showed in profiles of a thousand woken blocking queries).
_ALLOW_ALL = Authorizer.allow_all()


def request_secret() -> str | None:
    """The token the request carries, if any: Consul's header, a bearer token, or, last,
    ``?token=``. The query parameter is what python-consul and py-consul send when given a
    token, and what a node agent passes on unchanged when it forwards such a request; without
    it those clients' requests were silently anonymous (a 403 under default deny, or, worse,
    the anonymous token's rights mistaken for theirs). The token is never logged: Trellis
    writes no access log, and no error message repeats the query string."""
    token = request.headers.get("X-Consul-Token")
    if token:
        return token.strip()
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        bearer = auth[7:].strip()
        if bearer:
            return bearer
    return request.args.get("token", "").strip() or None


def require(allowed: bool, permission: str) -> None:
    """Refuse with Consul's 403 unless ``allowed``; nothing has changed yet when this runs."""
    if not allowed:
        raise PermissionDenied(f"Permission denied: token lacks permission '{permission}'")


def fresh_indexes() -> Mapping[str, int]:
    """The store's ACL and intention indexes, read once per request, when first needed: a read
    that began after the request did, so the caches it is given to answer from a state that
    includes every write acknowledged before the request."""
    if "trellis_fresh" not in g:
        g.trellis_fresh = services().fresh.get()
    return g.trellis_fresh


def _resolve() -> tuple[ACLToken | None, Authorizer]:
    if "trellis_acl" not in g:
        if not services().settings.acl_enabled:
            g.trellis_acl = (None, _ALLOW_ALL)
        else:
            g.trellis_acl = services().acls.resolve(request_secret(), indexes=fresh_indexes())
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


def initial_management(secret: str) -> None:
    """``acl.tokens.initial_management``: make the first management token with this secret
    if the store was never bootstrapped (compare-and-set decides among workers and replicas,
    as for ``PUT /v1/acl/bootstrap``). On a store bootstrapped already the configured secret
    is not installed: a token the operator may have rotated or deleted must not come back
    because a config file still names it. A mismatch is logged (never the secret), so that
    an operator who expected the configured secret to work learns why it does not."""
    import logging

    if bootstrap(secret) is not None:
        logging.getLogger(__name__).info(
            "ACL bootstrapped with the token of acl.tokens.initial_management"
        )
        return
    store = services().store
    mine = store.acl_token(secret_hash=hash_secret(secret))
    if mine is not None and MANAGEMENT_POLICY_ID in mine.policies:
        return
    got = store.system_get(BOOTSTRAP_DOC)
    first = got[0].get("AccessorID") if got is not None and isinstance(got[0], dict) else None
    if first and store.acl_token(accessor_id=first) is None and mine is None:
        # Another process won the bootstrap a moment ago and has not written its token yet
        # (or the operator deleted it): nothing to compare with.
        return
    logging.getLogger(__name__).warning(
        "acl.tokens.initial_management is set but this store was bootstrapped with another"
        " token; the configured secret was not installed (ACLs are unchanged)"
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
