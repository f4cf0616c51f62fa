"""The per-process ACL and intention caches (api/acl/cache.py, api/intentions.py), without Flask,
on real SQLite and PostgreSQL stores.

The rule they hold (issue 9, item 1): once an ACL or intention write is acknowledged, no request
that starts later is decided by the state before it, whichever process made the write. Two
stores opened on one database stand for two processes: each has its own change feed, and no
follower runs, so a cache can only learn of the other's writes from the store itself. The
interleaving that left a stale token in the cache (a request that missed it, reading while a
delete committed, then storing what it had read) is reproduced step by step with a small store
wrapper that holds a read's answer until the test lets it go.
"""

from __future__ import annotations

import threading

import pytest

from trellis.api.acl.cache import AuthorizerCache, dns_authorizer, hash_secret
from trellis.api.errors import PermissionDenied
from trellis.api.feed import FreshReads
from trellis.api.intentions import IntentionCache
from trellis.api.store import open_store
from trellis.api.store.security import ACLPolicy, ACLToken, IntentionRecord

PROMPT = 10.0
KV_WRITE = 'key_prefix "app/" { policy = "write" }'
KV_DENY = 'key_prefix "app/" { policy = "deny" }'
POLICY_ID = "11111111-1111-1111-1111-111111111111"
ACCESSOR = "22222222-2222-2222-2222-222222222222"
SECRET = "33333333-3333-3333-3333-333333333333"
ANONYMOUS = "00000000-0000-0000-0000-000000000002"


@pytest.fixture
def two(store_url):
    """Two stores on one database: two server processes, as far as the caches can tell."""
    a, b = open_store(store_url), open_store(store_url)
    yield a, b
    a.close()
    b.close()


def fresh_of(store) -> FreshReads[dict[str, int]]:
    return FreshReads(lambda: store.topic_indexes("acl", "intentions"))


def acl_cache(store, *, default_allow: bool = False) -> AuthorizerCache:
    return AuthorizerCache(store, default_allow=default_allow, fresh=fresh_of(store).get)


def put_policy(store, rules: str, *, create: bool = False) -> None:
    store.acl_policy_put(ACLPolicy(id=POLICY_ID, name="app", rules=rules), create=create)


def put_token(store, *, create: bool = True, accessor: str = ACCESSOR, secret: str = SECRET):
    store.acl_token_put(
        ACLToken(accessor_id=accessor, secret_hash=hash_secret(secret), policies=(POLICY_ID,)),
        create=create,
    )


def may_write(cache: AuthorizerCache, secret: str | None = SECRET) -> bool:
    return cache.resolve(secret)[1].key_write("app/x")


INTENTION_ID = "44444444-4444-4444-4444-444444444444"


def intention(store, action: str) -> None:
    store.intention_put(IntentionRecord(INTENTION_ID, "web", "db", action))


class Held:
    """The store, except that ``acl_resolve`` and ``intentions_at`` can be made to hold their
    answer (already read) until released: a request whose read yielded to others."""

    def __init__(self, store) -> None:
        self.store = store
        self.hold = False
        self.reached = threading.Event()
        self.release = threading.Event()

    def _held(self, value):
        if self.hold:
            self.hold = False
            self.reached.set()
            assert self.release.wait(PROMPT)
        return value

    def acl_resolve(self, secret_hash: str):
        return self._held(self.store.acl_resolve(secret_hash))

    def intentions_at(self):
        return self._held(self.store.intentions_at())


class InThread(threading.Thread):
    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:
            self.error = e


# -- the store reads the caches rely on --------------------------------------------------------


def test_topic_indexes_reads_each_topic_and_zero_for_one_never_written(store):
    assert store.topic_indexes("acl", "intentions") == {"acl": 0, "intentions": 0}
    assert store.topic_indexes() == {}
    put_policy(store, KV_WRITE, create=True)
    intention(store, "allow")
    got = store.topic_indexes("acl", "intentions", "nothing")
    assert got == {
        "acl": store.topic_index("acl"),
        "intentions": store.topic_index("intentions"),
        "nothing": 0,
    }
    assert 0 < got["acl"] < got["intentions"]


def test_acl_resolve_reads_the_token_its_policies_and_the_acl_index_together(store):
    assert store.acl_resolve(hash_secret(SECRET)) == (None, [], 0)
    put_policy(store, KV_WRITE, create=True)
    other = "55555555-5555-5555-5555-555555555555"
    store.acl_policy_put(ACLPolicy(id=other, name="other", rules=KV_DENY), create=True)
    store.acl_token_put(
        ACLToken(
            accessor_id=ACCESSOR,
            secret_hash=hash_secret(SECRET),
            policies=(other, POLICY_ID, "66666666-6666-6666-6666-666666666666"),
        ),
        create=True,
    )
    token, policies, index = store.acl_resolve(hash_secret(SECRET))
    assert token is not None and token.accessor_id == ACCESSOR
    assert [p.id for p in policies] == [
        other,
        POLICY_ID,
    ]  # the token's order; a missing one left out
    assert index == store.topic_index("acl")
    assert store.acl_resolve(hash_secret("nobody")) == (None, [], index)


def test_intentions_at_reads_the_intentions_and_their_index_together(store):
    assert store.intentions_at() == ([], 0)
    intention(store, "deny")
    records, index = store.intentions_at()
    assert [(r.source, r.destination, r.action) for r in records] == [("web", "db", "deny")]
    assert index == store.topic_index("intentions") > 0


# -- tokens and policies ----------------------------------------------------------------------


def test_a_token_deleted_by_another_process_is_refused_by_the_next_request(two):
    a, b = two
    put_policy(a, KV_WRITE, create=True)
    put_token(a)
    cache = acl_cache(b)
    assert may_write(cache)  # cached in b's process
    assert a.acl_token_delete(ACCESSOR)  # acknowledged by "the other process"
    with pytest.raises(PermissionDenied, match="ACL not found"):
        cache.resolve(SECRET)


def test_a_policy_cut_back_by_another_process_binds_the_next_request(two):
    a, b = two
    put_policy(a, KV_WRITE, create=True)
    put_token(a)
    cache = acl_cache(b)
    assert may_write(cache)
    put_policy(a, KV_DENY)
    assert not may_write(cache)
    put_policy(a, KV_WRITE)
    assert may_write(cache)


def test_a_read_that_began_before_a_delete_is_never_cached_after_it(two):
    """The defect itself: request 1 misses the cache and reads the token (still there); the
    delete commits; request 2 sees the change; then request 1 files what it read. Before the
    fix that stale entry answered every later request until the next ACL write."""
    a, b = two
    put_policy(a, KV_WRITE, create=True)
    put_token(a)
    held = Held(b)
    cache = AuthorizerCache(held, default_allow=False, fresh=fresh_of(b).get)
    held.hold = True
    first = InThread(lambda: may_write(cache))
    first.start()
    assert held.reached.wait(PROMPT)  # request 1 has read the token, and is held
    assert a.acl_token_delete(ACCESSOR)
    with pytest.raises(PermissionDenied):
        cache.resolve(SECRET)  # request 2, after the ack
    held.release.set()
    first.join(PROMPT)
    # Request 1 started before the delete was acknowledged: its answer may be the old one.
    assert first.error is None and first.result is True
    for _ in range(3):  # every request after the ack: refused, whatever request 1 did
        with pytest.raises(PermissionDenied):
            cache.resolve(SECRET)


def test_a_read_that_began_before_a_policy_cut_back_is_never_cached_after_it(two):
    a, b = two
    put_policy(a, KV_WRITE, create=True)
    put_token(a)
    held = Held(b)
    cache = AuthorizerCache(held, default_allow=False, fresh=fresh_of(b).get)
    put_policy(a, KV_WRITE)  # any ACL write: the cache is empty again
    held.hold = True
    first = InThread(lambda: may_write(cache))
    first.start()
    assert held.reached.wait(PROMPT)
    put_policy(a, KV_DENY)
    assert not may_write(cache)
    held.release.set()
    first.join(PROMPT)
    assert first.result is True
    assert not may_write(cache)


def test_unknown_secrets_are_refused_and_the_anonymous_token_follows_the_default(two):
    a, _ = two
    assert not may_write(acl_cache(a), None)  # no anonymous token yet: default deny
    assert may_write(acl_cache(a, default_allow=True), None)
    with pytest.raises(PermissionDenied, match="ACL not found"):
        acl_cache(a).resolve("no-such-secret")


def test_dns_answers_under_the_anonymous_token_as_of_each_query(two):
    a, b = two
    assert dns_authorizer(False, acl_cache(b)) is None  # ACLs off: no rules at all
    authorizer = dns_authorizer(True, acl_cache(b))
    assert authorizer is not None
    put_policy(a, 'service_prefix "" { policy = "read" }', create=True)
    put_token(a, accessor=ANONYMOUS, secret="anonymous")
    rules = authorizer()
    assert rules is not None and rules.service_read("web")
    put_policy(a, 'service_prefix "" { policy = "deny" }')
    rules = authorizer()
    assert rules is not None and not rules.service_read("web")


# -- intentions -------------------------------------------------------------------------------


def allowed(cache: IntentionCache) -> bool:
    return cache.get().decide("web", "db", default_allow=False).allowed


def test_an_intention_flipped_by_another_process_decides_the_next_request(two):
    a, b = two
    cache = IntentionCache(b, fresh=fresh_of(b).get)
    intention(a, "allow")
    assert allowed(cache)
    intention(a, "deny")
    assert not allowed(cache)


def test_a_rebuild_that_began_before_a_flip_does_not_answer_after_it(two):
    a, b = two
    intention(a, "allow")
    held = Held(b)
    cache = IntentionCache(held, fresh=fresh_of(b).get)
    held.hold = True
    first = InThread(lambda: allowed(cache))
    first.start()
    assert held.reached.wait(PROMPT)  # a rebuild has read "allow", and is held
    intention(a, "deny")
    second = InThread(lambda: allowed(cache))
    second.start()  # waits for the rebuild under way, finds it too old, rebuilds
    held.release.set()
    first.join(PROMPT)
    second.join(PROMPT)
    assert first.result is True  # began before the flip was acknowledged
    assert second.error is None and second.result is False
    assert not allowed(cache)
