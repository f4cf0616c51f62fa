"""Which server processes share the store, so that a cluster-wide limit can be split among them.

Theory of operation
-------------------
Every server process (each gunicorn worker of each replica) is a *member* with a random ID. It
writes its ID and the time into the store's ``members`` table when it starts, then every
``BEAT`` seconds (from the maintenance loop), and deletes its row when it stops gracefully. A
member not seen for ``TTL`` seconds is dead: whoever beats next deletes its row. Each beat also
reads the live members back, so every process knows, a few seconds late at most, how many
processes there are and where it stands among them (its rank in the sorted IDs). That is all
the CSR limits need (``trellis.api.ca.limits``): each process enforces its share of the
configured cluster-wide figure, with no store access on the signing path.

The beats take no index and record no change (``Store.member_beat``): nothing watches them,
and ``X-Consul-Index`` does not move. Times are the processes' own clocks, so replicas'
clocks must agree to well within ``TTL`` (NTP does).

Between a process starting and the others' next beat (``BEAT`` seconds at most), the older
processes still use their larger share; a process that dies without leaving is counted until
its row is ``TTL`` old, which only makes the others' shares smaller (safe) meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from trellis.api.store.base import Store

log = logging.getLogger("trellis.members")

#: Seconds between two beats of a member.
BEAT = 2.0
#: Seconds after its last beat at which a member counts as dead.
TTL = 10.0


class Membership:
    """This process's membership: ``beat`` writes (at most every ``BEAT`` s), ``share``
    answers from memory."""

    def __init__(
        self,
        store: Store,
        *,
        member_id: str | None = None,
        clock: Callable[[], float] = time.time,
        beat: float = BEAT,
        ttl: float = TTL,
    ) -> None:
        self.store = store
        self.id = member_id or uuid.uuid4().hex
        self._clock = clock
        self._beat = beat
        self._ttl = ttl
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._share = (0, 1)  # (rank, count), replaced whole so readers see a consistent pair

    def beat(self, *, force: bool = False) -> None:
        """Tell the store this process is alive and learn who else is (StoreUnavailable if
        the store is down: the caller retries at its next round)."""
        now = self._clock()
        if not force and now - self._last < self._beat:
            return
        live = self.store.member_beat(self.id, now, now - self._ttl)
        if self.id not in live:  # cannot happen (it was just written); count it anyway
            live = sorted([*live, self.id])
        with self._lock:
            self._last = now
            self._share = (live.index(self.id), len(live))

    def leave(self) -> None:
        try:
            self.store.member_leave(self.id)
        except Exception as e:  # stopping anyway; the row expires after TTL
            log.warning("could not leave the member list: %s", e)

    def share(self) -> tuple[int, int]:
        """This process's rank among the live members and their number. No I/O."""
        return self._share
