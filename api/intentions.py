"""Intentions on the server: the compiled ``IntentionSet`` each process decides with.

No Flask: the views (``trellis.api.views.intentions``), the node agent and tests use it alike,
with the store and a fresh read of its indexes given explicitly.

Decisions (``/intentions/check``, ``/intentions/match``, ``/agent/connect/authorize``) come from
an in-memory ``trellis.proxy.authz.IntentionSet`` per process, so each costs a few dictionary
lookups, not a query. It follows the rule the ACL cache follows (``trellis.api.acl.cache``):
once an intention write is acknowledged, no request that starts later, on any worker or replica,
is decided by the intentions before it. The set is versioned by the store's ``intentions``
index: a request learns that index from a read that began after it did, and rebuilds the set if
the set is older. A rebuild reads the intentions and their index from one snapshot; requests
that need a rebuild while one is under way wait for it and take it if it is new enough.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from trellis.api.settings import Settings
from trellis.api.store.security import IntentionRecord
from trellis.proxy import authz

#: The store topic every intention write touches; its index versions the cache.
INTENTIONS_TOPIC = "intentions"


class IntentionReader(Protocol):
    """What the cache needs from the store."""

    def intentions_at(self) -> tuple[list[IntentionRecord], int]: ...


def to_authz(r: IntentionRecord) -> authz.Intention:
    return authz.Intention(
        source=r.source,
        destination=r.destination,
        action=r.action,
        id=r.id,
        description=r.description,
        meta=dict(r.meta),
    )


def default_allow(settings: Settings) -> bool:
    """With ACLs off every connection is allowed by default (as in Consul and ``trellis dev``);
    with ACLs on, the ACL default policy decides."""
    return not settings.acl_enabled or settings.acl_default_policy == "allow"


class _Rebuild:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class IntentionCache:
    """This process's compiled intentions, never older than the request asking.

    ``fresh()`` returns the store's topic indexes (at least ``"intentions"``) from a read that
    began after it was called.
    """

    def __init__(self, store: IntentionReader, *, fresh: Callable[[], Mapping[str, int]]) -> None:
        self._store = store
        self._fresh = fresh
        self._lock = threading.Lock()
        self._index = -1  # the intentions index the set was built at
        self._set = authz.IntentionSet(())
        self._rebuild: _Rebuild | None = None

    def get(self, *, indexes: Mapping[str, int] | None = None) -> authz.IntentionSet:
        """The intentions, as of a moment after the caller's request started.

        ``indexes``: the store's indexes read after the request started (the HTTP boundary
        reads them once per request); without them the cache reads them itself.
        """
        now = (self._fresh() if indexes is None else indexes)[INTENTIONS_TOPIC]
        while True:
            with self._lock:
                if self._index >= now:
                    return self._set
                rebuild = self._rebuild
                lead = rebuild is None
                if rebuild is None:
                    rebuild = self._rebuild = _Rebuild()
            if not lead:
                # One rebuild at a time (a set of 100,000 intentions takes a while): wait for
                # it, then look again; it may have started too early for this request.
                rebuild.done.wait()
                continue
            try:
                records, at = self._store.intentions_at()
                built = authz.IntentionSet(to_authz(r) for r in records)
                with self._lock:
                    if at > self._index:
                        self._set, self._index = built, at
            finally:
                with self._lock:
                    self._rebuild = None
                rebuild.done.set()
