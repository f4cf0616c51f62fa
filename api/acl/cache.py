"""The Authorizer of each token, cached per process, never older than the request it serves.

No Flask: the HTTP boundary (``trellis.api.acl.service``), DNS and tests use it alike, with its
dependencies given explicitly (the store, the default policy, a fresh read of the ACL index).

Theory of operation
-------------------
Resolving a token takes store reads (the token, then its policies) and compiling their rules,
so each process keeps the result per secret hash. The rule the cache must hold: once an ACL
write is acknowledged, no request that starts later, on any worker or replica, is decided by
the state before it. Trusting the change feed broke it twice over:

* a process's feed learns of another process's write a little after it was acknowledged
  (PostgreSQL NOTIFY, SQLite polling), so every other worker and replica answered from the old
  state for a few milliseconds after the ack;
* a request that missed the cache read the token over store reads that yield (gevent), then
  stored what it had read after another request had emptied the cache for a newer write: a
  stale entry that lasted until the next ACL write, minutes later.

So the cache is versioned by the store's ACL index (the ``acl`` row of ``indexes``, which every
ACL write raises inside its own transaction):

1. A request first learns the ACL index *now*, from a read of the store that began after the
   request did (``fresh``; see ``trellis.api.feed.FreshReads``), so it counts every write
   acknowledged before the request. Entries computed at a lower index are dropped.
2. An entry is used only while it was computed at an index at least that high.
3. A miss reads the token, its policies and the ACL index from one snapshot, and files the
   result under that index only if it is the cache's (or moves the cache forward to it): a
   result read before a write can never be filed beside the results read after it.

Expiry is checked on every resolve, hit or miss, against the cache's clock: a token whose
``ExpirationTime`` has passed stops working at that moment, whatever the cache holds and
before the reaper deletes it (a deletion is an ACL write, which empties the cache anyway).

A token made by ``acl/login`` may also carry an expiry and identities bound as data
(``ACLToken.login``): that expiry is checked the same way, and the
identities become rules here (``identity_rules``), as Consul's service and node identities do.

The index read is one statement (one round trip on PostgreSQL), shared by the requests that
start together and, through ``indexes=``, by the intention cache within one request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from trellis.api.acl.rules import Authorizer, RulesError, parse_rules
from trellis.api.errors import PermissionDenied
from trellis.api.store.security import ACLPolicy, ACLToken

MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
ANONYMOUS_SECRET = "anonymous"  # noqa: S105 - Consul's well-known anonymous token, not a secret
#: The store topic every ACL write touches; its index versions the cache.
ACL_TOPIC = "acl"
#: Past this many tokens the cache starts over (tokens are many only under attack or churn).
MAX_ENTRIES = 10_000

Resolved = tuple[ACLToken | None, Authorizer]


class ACLReader(Protocol):
    """What the cache needs from the store."""

    def acl_resolve(self, secret_hash: str) -> tuple[ACLToken | None, list[ACLPolicy], int]: ...


def hash_secret(secret: str) -> str:
    """Secrets are random UUIDs, so a plain SHA-256 is enough to keep them out of the store."""
    return hashlib.sha256(secret.encode()).hexdigest()


class AuthorizerCache:
    """Per-process cache of resolved tokens; see the module docstring for why it is fresh.

    ``fresh()`` returns the store's topic indexes (at least ``"acl"``) from a read that began
    after it was called; ``default_allow`` is the ACL default policy; ``clock`` (epoch
    seconds) decides when a token has expired.
    """

    def __init__(
        self,
        store: ACLReader,
        *,
        default_allow: bool,
        fresh: Callable[[], Mapping[str, int]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self._default_allow = default_allow
        self._fresh = fresh
        self._lock = threading.Lock()
        self._index = -1  # the ACL index every entry was computed at
        self._entries: dict[str, Resolved] = {}

    def resolve(self, secret: str | None, *, indexes: Mapping[str, int] | None = None) -> Resolved:
        """The token (None for the anonymous one before it exists) and its Authorizer.

        ``indexes``: the store's indexes read after the caller's request started (the HTTP
        boundary reads them once per request); without them the cache reads them itself.
        PermissionDenied "ACL not found" for a secret that names no token: the client's fault.
        """
        h = hash_secret(secret if secret is not None else ANONYMOUS_SECRET)
        return self.resolve_hash(h, anonymous=secret is None, indexes=indexes)

    def resolve_hash(
        self,
        h: str,
        *,
        anonymous: bool = False,
        indexes: Mapping[str, int] | None = None,
    ) -> Resolved:
        """``resolve`` for a secret known only by its hash (``hash_secret``): the token a
        prepared query runs with is kept that way. PermissionDenied "ACL not found" if it
        names no token (and is not the ``anonymous`` one)."""
        now = (self._fresh() if indexes is None else indexes)[ACL_TOPIC]
        with self._lock:
            if now > self._index:
                self._entries = {}
                self._index = now
            hit = self._entries.get(h)
        if hit is not None:
            self._check_expiry(hit[0])
            return hit
        token, policies, at = self._store.acl_resolve(h)
        if token is None and not anonymous:
            raise PermissionDenied("ACL not found")
        self._check_expiry(token)
        result = (token, self._authorizer(token, policies))
        with self._lock:
            if at > self._index:
                self._entries = {}
                self._index = at
            if at == self._index:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries = {}
                self._entries[h] = result
        # Read after ``now`` was, so at least as new: right for this request even if a newer
        # write kept it out of the cache.
        return result

    def _check_expiry(self, token: ACLToken | None) -> None:
        """PermissionDenied "ACL not found" (as Consul answers) once the token has expired,
        by its own ``ExpirationTime`` or its login's: the client's fault, its token is no
        longer one."""
        if token is None:
            return
        now = self._clock()
        login = token.login
        if (token.expires_at is not None and token.expires_at <= now) or (
            login is not None and login.expires_at is not None and now >= login.expires_at
        ):
            raise PermissionDenied("ACL not found")

    def _authorizer(self, token: ACLToken | None, policies: Sequence[ACLPolicy]) -> Authorizer:
        if token is None:
            # No anonymous token yet (ACLs just enabled): the default policy alone.
            return Authorizer((), default_allow=self._default_allow)
        # Held directly or through a role.
        if any(p.id == MANAGEMENT_POLICY_ID for p in policies):
            return Authorizer.management()
        rules = []
        for p in policies:  # a deleted policy is not among them: it grants nothing
            try:
                rules.append(parse_rules(p.rules))
            except RulesError:
                # Rules are checked on write, so this is a damaged store. Skipping the policy
                # would drop its denies and grant more; deny everything instead.
                return Authorizer((), default_allow=False)
        if token.login is not None:
            rules.extend(parse_rules(identity_rules(t, n)) for t, n in token.login.binds)
        return Authorizer(rules, default_allow=self._default_allow)


def identity_rules(bind_type: str, name: str) -> str:
    """The rules of an identity a login bound (Consul's service and node identities): a
    service may write itself and its sidecar and read the catalog; a node may write itself and
    read services. An unknown kind grants nothing (a newer server's row read by an older one)."""
    q = json.dumps(name)
    if bind_type == "service":
        side = json.dumps(name + "-sidecar-proxy")
        return (
            f'service {q} {{ policy = "write" }}\n'
            f'service {side} {{ policy = "write" }}\n'
            'service_prefix "" { policy = "read" }\n'
            'node_prefix "" { policy = "read" }\n'
        )
    if bind_type == "node":
        return f'node {q} {{ policy = "write" }}\nservice_prefix "" {{ policy = "read" }}\n'
    return ""


def dns_authorizer(
    acl_enabled: bool, acls: AuthorizerCache, token: str = ""
) -> Callable[[], Authorizer | None] | None:
    """The rules DNS answers under, for ``trellis.api.dns``: None with ACLs off; otherwise those
    of ``token`` (``acl.tokens.dns``), or of the anonymous token when it is unset (DNS carries
    no token; Consul's DNS uses its DNS token, else the default one), resolved per query, so
    that a policy change acknowledged before a query reaches it, on every worker. A configured
    token that names no token (deleted, mistyped) answers nothing: falling back to the
    anonymous token's rules would answer with rights the operator did not choose for DNS."""
    if not acl_enabled:
        return None
    deny = Authorizer((), default_allow=False)

    def authorizer() -> Authorizer:
        if not token:
            return acls.resolve(None)[1]
        try:
            return acls.resolve(token)[1]
        except PermissionDenied:
            return deny

    return authorizer


def dns_query_authorizer(
    acl_enabled: bool, acls: AuthorizerCache
) -> Callable[[str], Authorizer] | None:
    """The rules a prepared query with a token of its own answers under over DNS, from the
    token's hash (``trellis.api.dns``); None with ACLs off. PermissionDenied if the token is
    gone."""
    if not acl_enabled:
        return None

    def authorizer(secret_hash: str) -> Authorizer:
        return acls.resolve_hash(secret_hash)[1]

    return authorizer
