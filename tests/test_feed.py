"""Unit tests of the change feed (api/feed.py): matching, publish/wait, positions, fan-out.

Threads are real; nothing here sleeps to wait for something to happen. Where a test must show
that a waiter is *not* woken, it gives the waiter a short timeout and checks it timed out.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.support import wait_until
from trellis.api.feed import ANY, Change, ChangeFeed, FreshReads, SharedReads, Watch

#: Generous upper bound for "returns promptly" on a loaded 2-core CI machine.
PROMPT = 5.0
#: How long a waiter that must not be woken is given before it times out.
SHORT = 0.2


class Waiter(threading.Thread):
    """A thread parked in ``feed.wait``; records its result and how long it took."""

    def __init__(self, feed: ChangeFeed, watch: Watch, after: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.feed, self.watch, self.after, self.timeout = feed, watch, after, timeout
        self.result: bool | None = None
        self.elapsed = -1.0

    def run(self) -> None:
        t0 = time.monotonic()
        self.result = self.feed.wait(self.watch, self.after, self.timeout)
        self.elapsed = time.monotonic() - t0


def park(feed: ChangeFeed, watches: list[Watch], timeout: float = PROMPT) -> list[Waiter]:
    """Start one waiter per watch and return once every one of them is parked."""
    before = feed.waiting()
    pos = feed.position()
    ws = [Waiter(feed, w, pos, timeout) for w in watches]
    for w in ws:
        w.start()
    wait_until(lambda: feed.waiting() == before + len(ws))
    return ws


# -- Watch.matches ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("watch", "change", "expected"),
    [
        (Watch("kv", exact=("a",)), Change(1, "kv", "a"), True),
        (Watch("kv", exact=("a",)), Change(1, "kv", "ab"), False),
        (Watch("kv", exact=("a",)), Change(1, "kv", ""), False),
        (Watch("kv", exact=("a",)), Change(1, "catalog", "a"), False),
        (Watch("kv", exact=("a", "b")), Change(1, "kv", "b"), True),
        (Watch("kv", prefixes=("app/",)), Change(1, "kv", "app/x/y"), True),
        (Watch("kv", prefixes=("app/",)), Change(1, "kv", "app/"), True),
        (Watch("kv", prefixes=("app/",)), Change(1, "kv", "app"), False),
        (Watch("kv", prefixes=("app/",)), Change(1, "kv", "apple"), False),
        (Watch("kv", prefixes=("x/", "app/")), Change(1, "kv", "app/z"), True),
        (Watch("kv", prefixes=("",)), Change(1, "kv", "anything"), True),
        (Watch("kv", prefixes=("",)), Change(1, "catalog", "svc/web"), False),
        (Watch("catalog", exact=("svc/web",)), Change(1, "catalog", "svc/web"), True),
        (Watch("catalog", exact=("svc/web",)), Change(1, "catalog", "svc/web2"), False),
        # ANY as the topic: everyone; ANY as the key: everyone on that topic.
        (Watch("kv", exact=("a",)), Change(1, ANY, ANY), True),
        (Watch("catalog", prefixes=("svc/",)), Change(1, ANY, "x"), True),
        (Watch("kv", exact=("a",)), Change(1, "kv", ANY), True),
        (Watch("catalog", exact=("svc/web",)), Change(1, "kv", ANY), False),
        # A watch with no keys matches only wildcards.
        (Watch("kv"), Change(1, "kv", "a"), False),
        (Watch("kv"), Change(1, "kv", ANY), True),
    ],
)
def test_watch_matches(watch: Watch, change: Change, expected: bool) -> None:
    assert watch.matches(change) is expected


# -- publish / position / wait without threads --------------------------------------------


def test_new_feed() -> None:
    feed = ChangeFeed()
    assert feed.position() == 0
    assert feed.published_index == 0
    assert feed.waiting() == 0
    assert feed.wait(Watch("kv", prefixes=("",)), 0, 0) is False


def test_position_counts_published_changes_and_published_index_is_the_max() -> None:
    feed = ChangeFeed()
    feed.publish([Change(5, "kv", "a"), Change(5, "kv", "b")])
    assert feed.position() == 2
    assert feed.published_index == 5
    # An older index published late (another process's commit read by the follower) does not
    # move published_index backwards.
    feed.publish([Change(3, "kv", "c")])
    assert feed.position() == 3
    assert feed.published_index == 5
    feed.publish([])
    assert feed.position() == 3


def test_change_published_after_position_is_seen_without_blocking() -> None:
    """The lost wake-up: the change lands between the read and the wait; wait must see it."""
    feed = ChangeFeed()
    w = Watch("kv", exact=("a",))
    pos = feed.position()
    feed.publish([Change(1, "kv", "a")])  # committed after pos, before wait
    t0 = time.monotonic()
    assert feed.wait(w, pos, 30) is True
    assert time.monotonic() - t0 < 1
    # timeout 0 still reports it (a non-blocking check)
    assert feed.wait(w, pos, 0) is True


def test_change_published_before_position_does_not_count() -> None:
    feed = ChangeFeed()
    w = Watch("kv", exact=("a",))
    feed.publish([Change(1, "kv", "a")])
    pos = feed.position()
    assert feed.wait(w, pos, 0) is False
    t0 = time.monotonic()
    assert feed.wait(w, pos, SHORT) is False
    assert time.monotonic() - t0 >= SHORT * 0.9
    assert feed.waiting() == 0


def test_only_matching_changes_after_position_count() -> None:
    feed = ChangeFeed()
    pos = feed.position()
    feed.publish([Change(1, "kv", "b"), Change(2, "catalog", "a"), Change(3, "kv", "ab")])
    assert feed.wait(Watch("kv", exact=("a",)), pos, 0) is False
    assert feed.wait(Watch("kv", exact=("b",)), pos, 0) is True
    assert feed.wait(Watch("kv", prefixes=("a",)), pos, 0) is True
    assert feed.wait(Watch("catalog", exact=("a",)), pos, 0) is True
    # from a later position only what came after counts
    assert feed.wait(Watch("kv", exact=("b",)), pos + 1, 0) is False
    assert feed.wait(Watch("kv", prefixes=("a",)), pos + 2, 0) is True
    assert feed.wait(Watch("kv", prefixes=("a",)), pos + 3, 0) is False


def test_republished_change_is_dropped() -> None:
    """A local write read back by the follower is published twice; it counts once."""
    feed = ChangeFeed()
    w = Watch("kv", exact=("a",))
    feed.publish([Change(1, "kv", "a")])
    pos = feed.position()
    feed.publish([Change(1, "kv", "a")])
    assert feed.position() == pos
    assert feed.wait(w, pos, 0) is False
    # duplicates inside one batch are dropped as well
    feed.publish([Change(2, "kv", "a"), Change(2, "kv", "a")])
    assert feed.position() == pos + 1
    # the same key at a new index is a new change
    assert feed.wait(w, pos, 0) is True


def test_any_changes_are_never_deduplicated() -> None:
    feed = ChangeFeed()
    feed.publish([Change(1, ANY, ANY)])
    pos = feed.position()
    feed.publish([Change(1, ANY, ANY)])
    assert feed.position() == pos + 1
    assert feed.wait(Watch("catalog", exact=("svc/x",)), pos, 0) is True


def test_history_loss_reports_true() -> None:
    """A waiter whose position fell out of the history cannot know; it must re-read."""
    feed = ChangeFeed(history=4)
    w = Watch("kv", exact=("never",))
    pos = feed.position()
    for i in range(1, 11):
        feed.publish([Change(i, "kv", f"other{i}")])
    assert feed.wait(w, pos, 0) is True
    # At the oldest retained position nothing was lost, and nothing matched.
    oldest_kept = feed.position() - 4
    assert feed.wait(w, oldest_kept, 0) is False
    assert feed.wait(w, oldest_kept - 1, 0) is True


def test_history_bounds_deduplication_memory() -> None:
    """Once a change has left the history it is no longer remembered (memory stays bounded)."""
    feed = ChangeFeed(history=2)
    feed.publish([Change(1, "kv", "a"), Change(2, "kv", "b"), Change(3, "kv", "c")])
    pos = feed.position()
    feed.publish([Change(3, "kv", "c")])  # still in history: dropped
    assert feed.position() == pos
    feed.publish([Change(1, "kv", "a")])  # forgotten: accepted again
    assert feed.position() == pos + 1


# -- threads -------------------------------------------------------------------------------


def test_publish_wakes_a_parked_waiter_promptly() -> None:
    feed = ChangeFeed()
    [w] = park(feed, [Watch("kv", exact=("a",))], timeout=30)
    feed.publish([Change(1, "kv", "a")])
    w.join(PROMPT)
    assert not w.is_alive()
    assert w.result is True
    assert w.elapsed < PROMPT
    assert feed.waiting() == 0


def test_timeout_returns_false_and_unregisters() -> None:
    feed = ChangeFeed()
    ws = park(feed, [Watch("kv", exact=("a",)), Watch("catalog", prefixes=("",))], timeout=SHORT)
    for w in ws:
        w.join(PROMPT)
        assert w.result is False
        assert SHORT * 0.9 <= w.elapsed < PROMPT
    assert feed.waiting() == 0


def test_one_publish_wakes_many_waiters() -> None:
    feed = ChangeFeed()
    watches = [Watch("catalog", exact=("svc/web",)) for _ in range(20)]
    watches += [Watch("catalog", prefixes=("svc/", "")) for _ in range(20)]
    ws = park(feed, watches, timeout=30)
    assert feed.waiting() == 40
    feed.publish([Change(7, "catalog", "svc/web")])
    for w in ws:
        w.join(PROMPT)
        assert w.result is True
    assert max(w.elapsed for w in ws) < PROMPT
    assert feed.waiting() == 0


def test_only_matching_waiters_are_woken() -> None:
    feed = ChangeFeed()
    a, b, app, cat = park(
        feed,
        [
            Watch("kv", exact=("a",)),
            Watch("kv", exact=("b",)),
            Watch("kv", prefixes=("app/",)),
            Watch("catalog", prefixes=("",)),
        ],
        timeout=30,
    )
    feed.publish([Change(1, "kv", "b")])
    b.join(PROMPT)
    assert b.result is True
    assert feed.waiting() == 3
    assert a.is_alive() and app.is_alive() and cat.is_alive()

    feed.publish([Change(2, "kv", "app/x")])
    app.join(PROMPT)
    assert app.result is True
    assert feed.waiting() == 2
    assert a.is_alive() and cat.is_alive()

    # a wildcard key wakes the rest of its topic only
    feed.publish([Change(3, "kv", ANY)])
    a.join(PROMPT)
    assert a.result is True
    assert feed.waiting() == 1
    assert cat.is_alive()

    feed.publish([Change(4, "catalog", "node/n1")])
    cat.join(PROMPT)
    assert cat.result is True
    assert feed.waiting() == 0


def test_republished_change_wakes_nobody() -> None:
    feed = ChangeFeed()
    feed.publish([Change(1, "kv", "a")])
    [w] = park(feed, [Watch("kv", exact=("a",))], timeout=SHORT)
    feed.publish([Change(1, "kv", "a")])
    w.join(PROMPT)
    assert w.result is False
    assert w.elapsed >= SHORT * 0.9


def test_any_change_wakes_every_waiter() -> None:
    feed = ChangeFeed()
    ws = park(
        feed,
        [
            Watch("kv", exact=("a",)),
            Watch("catalog", exact=("svc/web",)),
            Watch("intentions", prefixes=("",)),
        ],
        timeout=30,
    )
    feed.publish([Change(9, ANY, ANY)])
    for w in ws:
        w.join(PROMPT)
        assert w.result is True
    assert feed.waiting() == 0


def test_no_lost_wakeups_under_concurrency() -> None:
    """Readers follow the documented protocol (position, read, wait) against a racing writer.

    A lost wake-up would leave a reader parked until its 30 s timeout; the test would then take
    far longer than PROMPT and fail.
    """
    feed = ChangeFeed()
    state = {"n": 0}
    lock = threading.Lock()
    target = 300
    watch = Watch("kv", exact=("counter",))
    errors: list[str] = []

    def reader() -> None:
        seen = 0
        while seen < target:
            pos = feed.position()
            with lock:
                now = state["n"]
            if now > seen:
                seen = now
                continue
            t0 = time.monotonic()
            woke = feed.wait(watch, pos, 30)
            if not woke or time.monotonic() - t0 > PROMPT:
                errors.append(f"reader stuck at {seen}")
                return

    def writer() -> None:
        for i in range(1, target + 1):
            with lock:
                state["n"] = i
            feed.publish([Change(i, "kv", "counter")])
            if i % 7 == 0:
                time.sleep(0)  # let readers interleave

    readers = [threading.Thread(target=reader, daemon=True) for _ in range(8)]
    for r in readers:
        r.start()
    t0 = time.monotonic()
    writer()
    for r in readers:
        r.join(PROMPT * 2)
        assert not r.is_alive()
    assert errors == []
    assert time.monotonic() - t0 < PROMPT * 2
    assert feed.waiting() == 0


def test_topic_changed_since_is_per_topic_and_counts_any():
    feed = ChangeFeed()
    pos = feed.position()
    assert not feed.topic_changed_since("acl", pos)
    feed.publish([Change(1, "kv", "a")])
    assert not feed.topic_changed_since("acl", pos)
    assert feed.topic_changed_since("kv", pos)
    feed.publish([Change(2, "acl", "tokens")])
    assert feed.topic_changed_since("acl", pos)
    later = feed.position()
    assert not feed.topic_changed_since("acl", later)
    feed.publish([Change(3, ANY, ANY)])  # lost history: every cache must re-read
    assert feed.topic_changed_since("acl", later)
    assert feed.topic_changed_since("intentions", later)


# -- SharedReads: one read for the queries a change woke together ---------------------------


class SlowRead:
    """A compute that counts its calls and blocks until released (a read waiting on the
    database, during which other queries run)."""

    def __init__(self, value: object = "v", fail: bool = False) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.started = threading.Event()
        self.value, self.fail = value, fail

    def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        assert self.release.wait(PROMPT)
        if self.fail:
            raise RuntimeError("the store went away")
        return self.value


def test_a_remembered_result_serves_positions_up_to_its_own():
    shared = SharedReads()
    shared.remember("k", 5, "at5")
    never = SlowRead()
    assert shared.read("k", 5, never) == "at5"
    assert shared.read("k", 3, never) == "at5"
    assert never.calls == 0
    fresh = SlowRead("at6")
    fresh.release.set()
    assert shared.read("k", 6, fresh) == "at6"  # newer than what is known: read
    assert fresh.calls == 1
    assert shared.read("k", 6, never) == "at6"
    assert never.calls == 0


def test_an_older_result_never_replaces_a_newer_one():
    shared = SharedReads()
    shared.remember("k", 7, "new")
    shared.remember("k", 6, "old")
    assert shared.read("k", 7, SlowRead()) == "new"


def test_concurrent_woken_queries_share_one_read_in_flight():
    shared = SharedReads()
    read = SlowRead("once")
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(shared.read("k", 4, read)), daemon=True)
        for _ in range(20)
    ]
    threads[0].start()
    assert read.started.wait(PROMPT)  # the first one is reading...
    for t in threads[1:]:
        t.start()  # ...while the others arrive
    # Every other one has joined the read in flight (not merely arrived after it, when the
    # remembered result would serve it without any sharing to test).
    wait_until(lambda: shared.following() == 19)
    assert read.calls == 1
    read.release.set()
    for t in threads:
        t.join(PROMPT)
    assert results == ["once"] * 20
    assert read.calls == 1
    assert shared.following() == 0


def test_a_read_in_flight_from_an_older_position_does_not_serve_a_newer_query():
    shared = SharedReads()
    old = SlowRead("from4")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(shared.read("k", 4, old)), daemon=True)
    t.start()
    assert old.started.wait(PROMPT)
    new = SlowRead("from5")
    new.release.set()
    assert shared.read("k", 5, new) == "from5"  # does not wait for, or take, the older read
    assert new.calls == 1
    old.release.set()
    t.join(PROMPT)
    assert got == ["from4"]
    assert shared.read("k", 5, SlowRead()) == "from5"  # the older result did not replace it


def test_when_the_shared_read_fails_each_waiter_reads_for_itself():
    shared = SharedReads()
    failing = SlowRead(fail=True)
    errors: list[BaseException] = []

    def leader() -> None:
        try:
            shared.read("k", 1, failing)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=leader, daemon=True)
    t.start()
    assert failing.started.wait(PROMPT)
    fallback = SlowRead("own")
    fallback.release.set()
    got: list[object] = []
    w = threading.Thread(target=lambda: got.append(shared.read("k", 1, fallback)), daemon=True)
    w.start()
    wait_until(lambda: shared.following() == 1)  # waiting for the leader, not reading
    assert fallback.calls == 0
    failing.release.set()
    t.join(PROMPT)
    w.join(PROMPT)
    assert len(errors) == 1
    assert got == ["own"] and fallback.calls == 1


def test_the_remembered_results_are_bounded():
    shared = SharedReads(limit=3)
    for i in range(10):
        shared.remember(f"k{i}", 1, i)
    again = SlowRead("re-read")
    again.release.set()
    assert shared.read("k0", 1, again) == "re-read"  # long forgotten
    assert again.calls == 1
    assert shared.read("k9", 1, SlowRead()) == 9  # the latest is still there


def test_drain_wakes_every_waiter_and_parks_no_one_after():
    feed = ChangeFeed()
    pos = feed.position()
    waiters = [Waiter(feed, Watch("kv", exact=(f"k{i}",)), pos, PROMPT * 4) for i in range(5)]
    for w in waiters:
        w.start()
    wait_until(lambda: feed.waiting() == 5)
    feed.drain()
    for w in waiters:
        w.join(PROMPT)
        assert w.result is True and w.elapsed < PROMPT
    assert feed.waiting() == 0
    t0 = time.monotonic()
    assert feed.wait(Watch("kv", exact=("other",)), feed.position(), PROMPT) is True
    assert time.monotonic() - t0 < SHORT


# -- FreshReads: a read that began after the caller asked, shared by those who ask together --


class Reads:
    """A read function whose calls each block until released; call ``n`` returns ``n``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[threading.Event] = []
        self.release: list[threading.Event] = []
        self.fail: set[int] = set()

    def __call__(self) -> int:
        with self.lock:
            n = len(self.started) + 1
            self.started.append(threading.Event())
            self.release.append(threading.Event())
        self.started[n - 1].set()
        assert self.release[n - 1].wait(PROMPT)
        if n in self.fail:
            raise RuntimeError("the store went away")
        return n

    @property
    def calls(self) -> int:
        return len(self.started)


class Getter(threading.Thread):
    def __init__(self, fresh: FreshReads[int]) -> None:
        super().__init__(daemon=True)
        self.fresh = fresh
        self.result: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fresh.get()
        except BaseException as e:
            self.error = e

    def go(self) -> Getter:
        self.start()
        return self


def test_a_lone_caller_reads_at_once() -> None:
    reads = Reads()
    fresh = FreshReads(reads)
    alone = Getter(fresh).go()
    wait_until(lambda: reads.calls == 1, timeout=PROMPT, interval=0.001)
    assert fresh.waiting() == 0
    reads.release[0].set()
    alone.join(PROMPT)
    assert alone.result == 1


def test_a_caller_never_takes_a_read_that_began_before_it() -> None:
    """The read under way when a caller arrives may predate a write the caller's client saw
    acknowledged: the caller waits for the next read, which starts after it arrived."""
    reads = Reads()
    fresh = FreshReads(reads)
    early = Getter(fresh).go()
    wait_until(lambda: reads.calls == 1, timeout=PROMPT, interval=0.001)
    late = [Getter(fresh).go() for _ in range(2)]
    wait_until(lambda: fresh.waiting() == 2, timeout=PROMPT, interval=0.001)
    assert reads.calls == 1, "nobody may start a second read while the first is under way"
    reads.release[0].set()
    early.join(PROMPT)
    assert early.result == 1
    wait_until(
        lambda: reads.calls == 2, timeout=PROMPT, interval=0.001
    )  # the next read starts once the first has ended
    assert all(g.result is None for g in late), "the late callers took the early read"
    reads.release[1].set()
    for g in late:
        g.join(PROMPT)
    assert [g.result for g in late] == [2, 2]
    assert reads.calls == 2


def test_callers_that_arrive_together_cost_at_most_two_reads() -> None:
    reads = Reads()
    fresh = FreshReads(reads)
    first = Getter(fresh).go()
    wait_until(lambda: reads.calls == 1, timeout=PROMPT, interval=0.001)
    crowd = [Getter(fresh).go() for _ in range(30)]
    wait_until(lambda: fresh.waiting() == 30, timeout=PROMPT, interval=0.001)
    reads.release[0].set()
    wait_until(lambda: reads.calls == 2, timeout=PROMPT, interval=0.001)
    reads.release[1].set()
    for g in [first, *crowd]:
        g.join(PROMPT)
    assert first.result == 1 and {g.result for g in crowd} == {2}
    assert reads.calls == 2
    # And with nothing under way, the next caller reads at once, for itself.
    alone = Getter(fresh).go()
    wait_until(lambda: reads.calls == 3, timeout=PROMPT, interval=0.001)
    reads.release[2].set()
    alone.join(PROMPT)
    assert alone.result == 3


def test_when_the_shared_read_fails_each_caller_that_joined_it_reads_for_itself() -> None:
    reads = Reads()
    reads.fail = {2}
    fresh = FreshReads(reads)
    first = Getter(fresh).go()
    wait_until(lambda: reads.calls == 1, timeout=PROMPT, interval=0.001)
    leader = Getter(fresh).go()
    wait_until(lambda: fresh.waiting() == 1, timeout=PROMPT, interval=0.001)
    joiner = Getter(fresh).go()
    wait_until(lambda: fresh.waiting() == 2, timeout=PROMPT, interval=0.001)
    reads.release[0].set()
    wait_until(lambda: reads.calls == 2, timeout=PROMPT, interval=0.001)
    reads.release[1].set()  # the shared read (the leader's) fails
    leader.join(PROMPT)
    assert isinstance(leader.error, RuntimeError)
    wait_until(
        lambda: reads.calls == 3, timeout=PROMPT, interval=0.001
    )  # the joiner reads for itself
    reads.release[2].set()
    joiner.join(PROMPT)
    first.join(PROMPT)
    assert (first.result, joiner.result, joiner.error) == (1, 3, None)
