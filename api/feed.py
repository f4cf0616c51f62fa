"""The change feed: how a blocking query learns that a write concerns it.

Theory of operation
-------------------
Every write transaction takes the next value of the store's one global index and records, in
the same transaction, the *changes* it made: ``(index, topic, key)`` rows such as
``(42, "kv", "app/config")`` or ``(43, "catalog", "svc/web")``. After the commit the writer
publishes those changes to the feed of its own process at once; a background follower (see
``trellis.api.store``) publishes the changes that *other* processes committed (SQLite: a cheap
``PRAGMA data_version`` poll; PostgreSQL: LISTEN/NOTIFY plus a slow poll and a re-read after every
reconnect, because a NOTIFY sent while a listener is disconnected is lost for good).

A blocking query:

1. takes ``pos = feed.position()``;
2. reads its result from the store (which sees every commit made before step 1), and the
   result's index no later than the result itself (``trellis.api.http.blocking``): an index
   read after the result may already count a write the result missed, and the client, sent
   that index, would then be parked past the very write it has not seen;
3. if the result's index is not above the client's, calls ``feed.wait(watch, pos, timeout)``,
   which returns at once if a matching change was published after ``pos`` and otherwise parks on
   an event until one is;
4. goes back to 2.

Because the position is taken *before* the read, a change committed between the read and the
wait is never missed. Waiters are filed by topic, and a change only wakes the waiters whose watch
matches it, so a thousand long-polls on a thousand keys cost one match per write, not a thousand
re-reads. Duplicate publications (a local write seen again by the follower) are dropped by index.

The only primitives are ``threading.Lock`` and ``threading.Event``, so the same code works under
gunicorn's gevent worker (where they are cooperative) and under threads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

T = TypeVar("T")

#: A change whose topic is ANY wakes every waiter (used when the follower lost history).
ANY = "*"


@dataclass(frozen=True, slots=True)
class Change:
    index: int
    topic: str
    key: str


@dataclass(frozen=True, slots=True)
class Watch:
    """What a blocking query cares about: keys of one topic, exactly or by prefix.

    ``Watch("kv", exact=("a",))`` wakes on key ``a``; ``Watch("kv", prefixes=("app/",))`` on
    any key under ``app/``; ``Watch("catalog", prefixes=("",))`` on any catalog change.
    """

    topic: str
    exact: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def matches(self, change: Change) -> bool:
        if change.topic == ANY:
            return True
        if change.topic != self.topic:
            return False
        if change.key == ANY or change.key in self.exact:
            return True
        return any(change.key.startswith(p) for p in self.prefixes)


class _Waiter:
    __slots__ = ("event", "watch")

    def __init__(self, watch: Watch, event: threading.Event | None = None) -> None:
        self.watch = watch
        self.event = event if event is not None else threading.Event()


class ChangeFeed:
    """In-process fan-out of committed changes to parked blocking queries."""

    def __init__(self, history: int = 8192) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._recent: deque[tuple[int, Change]] = deque(maxlen=history)
        self._known: set[Change] = set()
        self._waiters: dict[str, set[_Waiter]] = {}
        self.published_index = 0
        #: The position of the last change published per topic (ANY counts for every topic).
        self._topic_seq: dict[str, int] = {}
        self._any_seq = 0
        #: Set by ``drain`` when the server is stopping: nothing parks any more.
        self.draining = False

    def position(self) -> int:
        return self._seq

    def waiting(self) -> int:
        """How many blocking queries are parked right now (for metrics and tests)."""
        with self._lock:
            return sum(len(s) for s in self._waiters.values())

    def publish(self, changes: Iterable[Change]) -> None:
        """Record committed changes and wake the waiters they concern.

        A change already in the history (a local write that the follower read back) is
        dropped, so it wakes nobody twice.
        """
        woken: list[_Waiter] = []
        with self._lock:
            for c in changes:
                if c.topic != ANY and c in self._known:
                    continue
                self._seq += 1
                if len(self._recent) == self._recent.maxlen:
                    self._known.discard(self._recent[0][1])
                self._recent.append((self._seq, c))
                self._known.add(c)
                if c.topic == ANY:
                    self._any_seq = self._seq
                else:
                    self._topic_seq[c.topic] = self._seq
                if c.index > self.published_index:
                    self.published_index = c.index
                if c.topic == ANY:
                    targets: Iterable[_Waiter] = [w for ws in self._waiters.values() for w in ws]
                else:
                    targets = self._waiters.get(c.topic, ())
                woken.extend(w for w in targets if w.watch.matches(c))
        for w in woken:
            w.event.set()

    def drain(self) -> None:
        """The server process is stopping: wake every parked query and let none park again,
        so that each answers at once with what it has (Consul clients then re-poll, against
        another server or this one once it is back) instead of being cut off."""
        with self._lock:
            self.draining = True
            waiters = [w for ws in self._waiters.values() for w in ws]
        for w in waiters:
            w.event.set()

    def topic_changed_since(self, topic: str, after: int) -> bool:
        """Whether anything of ``topic`` was published after position ``after``.

        O(1), for per-process caches of a whole topic (the CA's state) that ask on every
        request; ``wait(..., 0)`` would scan every change published since. A cache that must
        never answer from a state older than the request (ACLs, intentions) cannot rely on
        this: the feed learns of another process's writes a little late (see FreshReads).
        """
        return max(self._topic_seq.get(topic, 0), self._any_seq) > after

    def changes_after(self, after: int) -> list[Change] | None:
        """The changes published after position ``after``, oldest first; None when some of
        them are no longer in the history, or history was lost (an ANY change), so that the
        caller must start over from the store (DNS's name index uses this)."""
        with self._lock:
            if self._recent and after < self._recent[0][0] - 1:
                return None
            out: list[Change] = []
            for seq, c in reversed(self._recent):
                if seq <= after:
                    break
                if c.topic == ANY:
                    return None
                out.append(c)
        out.reverse()
        return out

    def wait(
        self,
        watch: Watch,
        after: int,
        timeout: float,
        event: threading.Event | None = None,
    ) -> bool:
        """Wait until a change matching ``watch`` is published after position ``after``.

        Returns True if such a change arrived (or history was lost, which the caller treats
        the same way: re-read), False on timeout. ``event``, when given, is the event the
        waiter parks on, so that the caller may also wake it for reasons of its own (the
        client went away); a wake-up from it returns True too.
        """
        with self._lock:
            if self.draining:
                return True
            if self._recent and after < self._recent[0][0] - 1:
                return True
            for seq, c in reversed(self._recent):
                if seq <= after:
                    break
                if watch.matches(c):
                    return True
            if timeout <= 0:
                return False
            w = _Waiter(watch, event)
            self._waiters.setdefault(watch.topic, set()).add(w)
        try:
            return w.event.wait(timeout)
        finally:
            with self._lock:
                ws = self._waiters.get(watch.topic)
                if ws is not None:
                    ws.discard(w)
                    if not ws:
                        del self._waiters[watch.topic]


class _Flight:
    __slots__ = ("done", "ok", "pos", "value")

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.done = threading.Event()
        self.ok = False
        self.value: object = None


class SharedReads:
    """One read of the store for all blocking queries that a change woke together.

    One write can wake a thousand parked queries for the same read (the same path, arguments
    and token). A result computed from feed position P reflects every change published by P, so
    it can answer any query woken at a position <= P. The first woken query computes; the
    others that arrive while it is computing wait for its result (single flight) instead of
    each starting the same read, which matters on PostgreSQL, where a read yields to the other
    greenlets while it waits for the database. If the computing query fails, each waiter reads
    for itself.

    Only woken queries use this: a fresh request always reads the store itself (``remember``
    records its result), so that a client reads its own writes even when another process
    served the write.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self._done: dict[Hashable, tuple[int, object]] = {}
        self._flights: dict[Hashable, _Flight] = {}
        self._following = 0  # queries waiting for another's read in flight

    def following(self) -> int:
        """How many queries are waiting for a read in flight started by another (for tests,
        which must know that a query joined a read rather than arrived after it)."""
        with self._lock:
            return self._following

    def remember(self, key: Hashable, pos: int, value: object) -> None:
        """Record ``value``, computed from position ``pos``, unless a newer one is known."""
        with self._lock:
            have = self._done.get(key)
            if have is not None and have[0] > pos:
                return
            if have is None and len(self._done) >= self._limit:
                self._done.clear()
            self._done[key] = (pos, value)

    def read(self, key: Hashable, pos: int, compute: Callable[[], T]) -> T:
        """A value for ``key`` computed from position ``pos`` or later."""
        with self._lock:
            have = self._done.get(key)
            if have is not None and have[0] >= pos:
                return cast(T, have[1])
            flight = self._flights.get(key)
            leader = flight is None or flight.pos < pos
            if leader:
                flight = _Flight(pos)
                self._flights[key] = flight
            else:
                self._following += 1
        assert flight is not None
        if not leader:
            try:
                flight.done.wait()
            finally:
                with self._lock:
                    self._following -= 1
            if flight.ok:
                return cast(T, flight.value)
            return compute()
        try:
            value = compute()
        except BaseException:
            self._land(key, flight)
            raise
        flight.value, flight.ok = value, True
        self.remember(key, pos, value)
        self._land(key, flight)
        return value

    def _land(self, key: Hashable, flight: _Flight) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.done.set()


class _Pending:
    __slots__ = ("callers", "done", "ok", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: object = None
        self.callers = 1


class FreshReads(Generic[T]):
    """Reads that begin after their caller asked, shared by the callers that ask together.

    ``get()`` returns the result of a call of ``read`` that *started* after ``get()`` was
    called, so it reflects every write committed (and so acknowledged) before that: what a
    per-process cache needs to know at the start of a request, on any worker or replica,
    because its change feed learns of another process's write only a little later.

    A read already under way when a caller arrives may have started before that caller's
    request (before a write the caller's client saw acknowledged), so the caller does not
    take its result: it waits for it to end and joins the next read, which starts then, for
    everyone who arrived meanwhile. So however many requests arrive together, at most one
    read is under way and one pending, and a caller waits for two reads at most (the one
    under way, then its own). If the shared read fails, each caller that joined it reads for
    itself (and meets the failure, a store outage, on its own).
    """

    def __init__(self, read: Callable[[], T]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._running: _Pending | None = None
        self._next: _Pending | None = None

    def waiting(self) -> int:
        """How many callers wait for a read that has not started yet (for tests)."""
        with self._lock:
            return 0 if self._next is None else self._next.callers

    def get(self) -> T:
        before: _Pending | None = None
        with self._lock:
            if self._next is not None:
                mine, lead = self._next, False
                mine.callers += 1
            elif self._running is None:
                mine, lead = _Pending(), True
                self._running = mine
            else:
                mine, lead, before = _Pending(), True, self._running
                self._next = mine
        if not lead:
            mine.done.wait()
            if mine.ok:
                return cast(T, mine.value)
            return self._read()
        try:
            if before is not None:
                before.done.wait()
                with self._lock:
                    # From here on nobody joins this read: it starts now.
                    self._next = None
                    self._running = mine
            value = self._read()
            mine.value, mine.ok = value, True
            return value
        finally:
            # Also when interrupted while waiting (a greenlet killed at shutdown): whoever
            # joined must not wait for a read that will never run.
            with self._lock:
                if self._next is mine:
                    self._next = None
                if self._running is mine:
                    self._running = None
            mine.done.set()
