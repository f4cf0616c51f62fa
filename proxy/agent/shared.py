"""Shared blocking reads: one watch on the servers per distinct read of a node's clients.

Why. A node's managed sidecars each follow the control plane with blocking queries (the CA
roots, the intentions of their destination, the healthy instances of each upstream). Forwarded
one by one, N sidecars on a node hold N parked queries each on the servers; most of them
identical. The agent holds one instead and answers every local client from it.

Theory of operation. A read is keyed by ``(path, query without index/wait, token)``. The first
client of a key starts its ``_Watch``: a task that reads the key on a server once without an
index, then loops on blocking queries (``?index=<last>&wait=WATCH_WAIT``), keeping the last
answer (status, headers and body exactly as the server gave them) and bumping a version on
every new one. A client's ``read(min_index, wait)`` is then answered with the server's
semantics: at once when the held answer's index is above ``min_index`` (or when there is no
``min_index``); otherwise when a new answer arrives, or when its own ``wait`` ends (with the
held answer, as a server answers a wait that ran out).

ACLs. The token is part of the key, so the servers' ACL filtering stays per token: a client
never sees an answer fetched with another token (the CA roots excepted, which need no ACL: see
``ROOTS_KEY``). And an answer that tells a client something new (an index above its own) is
one a server gave for its token after the client asked: the change its watch woke it with, or
the watch's first read, or else a read of its own made at once (``verify``), so that a token
revoked since the watch's last answer gets the server's 403, not the held answer. What a held
answer still gives without a server's say: the answer at the index the client sent back, when
its wait runs out (nothing it did not already have), and everything while no server answers.

Ending. A watch whose clients all went away for ``idle`` seconds is cancelled (its parked
query on the server closes). A server's 4xx other than a 404 with an index (a token that was
revoked, a bad query) is handed to the waiting clients and ends the watch: nothing is served
for that key until a server says otherwise again. So is a first read that fails: with nothing
held, the clients get the failure (``Unreachable``) as a forwarded read would. A blocking read
that comes back at once with the same index (a server draining) is retried after a backoff,
not at once.

Fail static. Once a watch holds an answer, a server that cannot be reached (or answers 5xx)
does not end it: it retries with capped, jittered backoff, its next read without an index (a
restarted server may have a lower index), and keeps answering its clients with what it holds,
marked ``X-Consul-KnownLeader: false`` and ``X-Consul-LastContact`` (milliseconds since a
server last answered), as a Consul agent marks a stale read. Blocking re-reads with the held
index still block until their wait ends, so sidecars do not spin while the servers are away.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("trellis.agent")

#: How long one of the agent's shared blocking queries waits on the server.
WATCH_WAIT = 300.0
#: A watch nobody asked for this long ends.
IDLE = 60.0
BACKOFF = (0.2, 10.0)
#: A blocking read back sooner than this with the same index did not block.
MIN_BLOCK = 1.0
#: Answers a watch holds and blocks on: a result, and a K/V key that does not exist (yet), on
#: which Consul's clients block until it is written. Any other status ends the watch.
HOLDABLE = frozenset({200, 404})

#: The node's one roots watch. ``/v1/connect/ca/roots`` (and its alias
#: ``/v1/agent/connect/ca/roots``) needs no ACL: the server's view (api/views/connect_ca.py,
#: ``roots``) never resolves the caller's token, as Consul's ConnectCA.Roots does not, so any
#: token, an unknown one too, gets the same answer. The watch is therefore made without a
#: token and serves every caller; the decision stays the server's only in that it made none.
ROOTS_PATH = "/v1/connect/ca/roots"
ROOTS_KEY = (ROOTS_PATH, (), "")

Headers = tuple[tuple[bytes, bytes], ...]
Key = tuple[str, tuple[tuple[str, str], ...], str]


class Unreachable(Exception):
    """No server answered a shared read (raised by ``fetch``, passed to its clients)."""


@dataclass(frozen=True)
class Answer:
    """A server's whole answer to a read, as it gave it."""

    status: int
    headers: Headers
    body: bytes

    @property
    def index(self) -> int | None:
        for k, v in self.headers:
            if k.lower() == b"x-consul-index":
                try:
                    return int(v)
                except ValueError:
                    return None
        return None


#: ``fetch(target, headers, head_timeout)``: one read on a server (raises Unreachable).
Fetch = Callable[[str, Headers, float], Awaitable[Answer]]


@dataclass
class _Watch:
    key: Key
    target: str
    headers: Headers
    answer: Answer | None = None
    version: int = 0
    #: Set (and replaced) on every new answer and when the watch ends.
    changed: trio.Event = field(default_factory=trio.Event)
    #: When a server last answered; None while it answers.
    stale_since: float | None = None
    last_contact: float = 0.0
    #: The watch ended: its clients get this (a server's 4xx Answer, or Unreachable).
    final: Answer | Unreachable | None = None
    waiters: int = 0
    last_used: float = 0.0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    pinned: bool = False
    #: News for a client that did not wait for it is read for its token (not for the roots).
    verify: bool = True

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def key_of(path: str, query: dict[str, list[str]], token: str) -> Key:
    """The sharing key of a read: its path, its query but for index and wait, its token."""
    items = sorted((k, v) for k, vs in query.items() if k not in ("index", "wait") for v in vs)
    return (path, tuple(items), token)


class SharedReads:
    """The agent's shared watches (see the module docstring). ``run`` must be running (it
    hosts the watches and ends idle ones) before ``read`` is called."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        idle: float = IDLE,
        watch_wait: float = WATCH_WAIT,
        backoff: tuple[float, float] = BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        self._fetch = fetch
        self._idle = idle
        self._watch_wait = watch_wait
        self._backoff = backoff
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._watches: dict[Key, _Watch] = {}
        self._nursery: trio.Nursery | None = None
        #: Upstream reads made (tests and the measurement in docs/benchmarks.md).
        self.fetches = 0

    def watching(self) -> int:
        """How many watches are open (one parked query each on a server)."""
        return len(self._watches)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(max(self._idle / 4, 0.01))
                self._end_idle()

    def _end_idle(self) -> None:
        now = trio.current_time()
        for w in list(self._watches.values()):
            if not w.pinned and w.waiters == 0 and now - w.last_used >= self._idle:
                log.debug("shared read %s: idle, ending its watch", w.target)
                self._drop(w)

    def _drop(self, w: _Watch) -> None:
        if self._watches.get(w.key) is w:
            del self._watches[w.key]
        w.scope.cancel()
        w._wake()

    def held(self, key: Key) -> Answer | None:
        """The answer a live watch holds for ``key`` (fail static for a non-blocking read
        that could not be forwarded), marked stale; None if there is none."""
        w = self._watches.get(key)
        if w is None or w.answer is None:
            return None
        w.last_used = trio.current_time()
        return self._marked(w, w.answer)

    async def read(
        self,
        key: Key,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        min_index: int | None,
        wait: float,
        pinned: bool = False,
        verify: bool = True,
    ) -> Answer:
        """Answer a client's read of ``key`` from its watch (started if need be): ``target``
        is the path and query without index/wait, ``headers`` what the server needs (the
        token). ``pinned``: the watch never ends for idleness; ``verify=False``: the answer
        is the same for every token (the roots). Raises Unreachable when no server answered
        and nothing is held."""
        w = self._watches.get(key)
        if w is None:
            assert self._nursery is not None, "SharedReads.run is not running"
            w = _Watch(key, target, tuple(headers), pinned=pinned, verify=verify)
            w.last_used = trio.current_time()
            self._watches[key] = w
            self._nursery.start_soon(self._follow, w)
        w.waiters += 1
        try:
            return await self._answer(w, min_index, wait)
        finally:
            w.waiters -= 1
            w.last_used = trio.current_time()

    async def _answer(self, w: _Watch, min_index: int | None, wait: float) -> Answer:
        arrived = trio.current_time()
        deadline = arrived + wait
        seen = w.version if w.answer is not None else None
        while True:
            if w.final is not None:
                if isinstance(w.final, Unreachable):
                    raise w.final
                return w.final
            a = w.answer
            if a is not None:
                if seen is None:
                    seen = w.version
                idx = a.index
                if (
                    not min_index
                    or idx is None
                    or idx > min_index
                    or w.version != seen
                    or trio.current_time() >= deadline
                ):
                    news = not min_index or idx is None or idx > min_index
                    if news and w.verify and w.stale_since is None and w.last_contact < arrived:
                        return await self._own_read(w)
                    return self._marked(w, a)
                with trio.move_on_at(deadline):
                    await w.changed.wait()
            else:
                # Nothing held yet: the first read has its own timeout and ends in an answer,
                # a final 4xx or Unreachable.
                await w.changed.wait()

    async def _own_read(self, w: _Watch) -> Answer:
        """A read of ``w``'s key for one client, now, with its token: the server decides
        (see ACLs in the module docstring). No server: the held answer, marked."""
        self.fetches += 1
        try:
            a = await self._fetch(w.target, w.headers, 60.0)
        except Unreachable:
            a = None
        if a is None or a.status >= 500:
            if w.answer is None:
                raise Unreachable("no server answered")
            return self._marked(w, w.answer)
        return a

    def _marked(self, w: _Watch, a: Answer) -> Answer:
        if w.stale_since is None:
            return a
        ms = int((trio.current_time() - w.last_contact) * 1000)
        kept = tuple(
            (k, v)
            for k, v in a.headers
            if k.lower() not in (b"x-consul-knownleader", b"x-consul-lastcontact")
        )
        return Answer(
            a.status,
            (*kept, (b"x-consul-knownleader", b"false"), (b"x-consul-lastcontact", b"%d" % ms)),
            a.body,
        )

    async def _follow(self, w: _Watch) -> None:
        try:
            await self._follow_loop(w)
        except Exception as e:
            # A bug of ours must not take the agent down with it: this key's clients get a
            # 503 and the next one starts a new watch.
            log.exception("shared read %s failed", w.target)
            w.final = Unreachable(f"the agent's shared read failed: {type(e).__name__}")
            self._drop(w)

    async def _follow_loop(self, w: _Watch) -> None:
        low, high = self._backoff
        delay = low
        index: int | None = None
        with w.scope:
            while True:
                target = w.target
                timeout = 60.0
                if index is not None:
                    sep = "&" if "?" in target else "?"
                    target += f"{sep}index={index}&wait={int(self._watch_wait)}s"
                    timeout = self._watch_wait * 1.1 + 30.0
                self.fetches += 1
                spin_at = trio.current_time() + MIN_BLOCK
                try:
                    a: Answer | None = await self._fetch(target, w.headers, timeout)
                    assert a is not None
                    failed = a.status >= 500
                    why = f"HTTP {a.status}"
                except Unreachable as e:
                    a, failed, why = None, True, str(e)
                if failed and w.answer is None:
                    # Nothing held: the clients get what a forwarded read would have.
                    w.final = a if a is not None else Unreachable(why)
                    self._drop(w)
                    return
                if failed:
                    if w.stale_since is None:
                        w.stale_since = trio.current_time()
                        log.warning("shared read %s: %s; serving what it holds", w.target, why)
                    index = None
                    await trio.sleep(delay * (0.5 + self._rng.random()))
                    delay = min(delay * 2, high)
                    continue
                assert a is not None
                if a.status not in HOLDABLE or a.index is None:
                    # A refusal (a revoked token, a bad query): nothing more to share.
                    w.final = a
                    self._drop(w)
                    return
                # Back at once with nothing new (a server draining, or one that does not park
                # this many queries of one client): wait before asking again.
                spun = index is not None and a.index == index and trio.current_time() < spin_at
                if w.stale_since is not None:
                    log.info("shared read %s: a server answers again", w.target)
                w.stale_since = None
                w.last_contact = trio.current_time()
                old = w.answer
                if old is None or (old.index, old.body) != (a.index, a.body):
                    w.answer = a
                    w.version += 1
                    w._wake()
                index = a.index
                if spun:
                    await trio.sleep(delay * (0.5 + self._rng.random()))
                    delay = min(delay * 2, high)
                else:
                    delay = low
