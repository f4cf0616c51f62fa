"""User events in the store (``/v1/event/fire``, ``/v1/event/list``): the value object and
the SQL that keeps a bounded history of them.

Theory of operation
-------------------
Consul carries a user event by gossip: every agent that hears it and matches its node,
service and tag filters keeps it in a ring of its last 256 events, and ``event/list`` reads
that ring. Trellis has no gossip; its servers share one store, so an event is a row there,
written by the one write transaction that fires it:

* the row gets the write's store index as its ``LTime`` (Consul's Lamport time: a
  cluster-wide order that only grows, which the store index is);
* the same transaction prunes the table to the newest ``keep`` events, so the history is
  bounded whatever the rate of fires, and a reader never sees more than ``keep``;
* it touches topic ``event`` (key: the event's name), so that blocking ``event/list``
  readers in every server process wake (``trellis.api.feed``).

Who sees which event (the filters) is decided by whoever answers ``event/list``, from the
filters kept on the row: ``trellis.api.events``.

Mixed into ``SQLStore``; uses its ``read``/``write`` plumbing and its ``Tx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def migration(blob: str) -> list[str]:
    return [
        f"CREATE TABLE events (id TEXT PRIMARY KEY, name TEXT NOT NULL, payload {blob},"
        " node_filter TEXT NOT NULL, service_filter TEXT NOT NULL,"
        " tag_filter TEXT NOT NULL, ltime BIGINT NOT NULL)",
        "CREATE INDEX events_by_ltime ON events (ltime)",
    ]


EVENT_COLS = "id, name, payload, node_filter, service_filter, tag_filter, ltime"


@dataclass(frozen=True)
class UserEvent:
    id: str
    name: str
    #: None: fired with no body (Consul's ``Payload: null``).
    payload: bytes | None = None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    #: The index of the write that fired it (0 until stored).
    ltime: int = 0


def _event(r: Sequence[Any]) -> UserEvent:
    return UserEvent(
        id=r[0],
        name=r[1],
        payload=bytes(r[2]) if r[2] is not None else None,
        node_filter=r[3],
        service_filter=r[4],
        tag_filter=r[5],
        ltime=int(r[6]),
    )


class EventStoreMixin:
    """User events; see the module's theory of operation."""

    # Provided by SQLStore.
    read: Any
    write: Any

    def event_fire(self, ev: UserEvent, *, keep: int) -> UserEvent:
        """Store an event (``ev.id`` fresh) and drop all but the newest ``keep``; the event
        as stored, with its ``ltime``."""
        with self.write() as tx:
            idx = tx.index
            tx.execute(
                f"INSERT INTO events ({EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    ev.id,
                    ev.name,
                    ev.payload,
                    ev.node_filter,
                    ev.service_filter,
                    ev.tag_filter,
                    idx,
                ),
            )
            # The (keep+1)-th newest and everything older go (nothing while there are fewer).
            tx.execute(
                "DELETE FROM events WHERE ltime <= (SELECT ltime FROM events"
                " ORDER BY ltime DESC LIMIT 1 OFFSET ?)",
                (max(1, keep),),
            )
            tx.touch("event", ev.name, topic_index_key=False)
            row = tx.one(f"SELECT {EVENT_COLS} FROM events WHERE id = ?", (ev.id,))  # noqa: S608
        return _event(row)

    def events(self) -> list[UserEvent]:
        """The stored events, oldest first."""
        with self.read() as q:
            rows = q(f"SELECT {EVENT_COLS} FROM events ORDER BY ltime")  # noqa: S608
        return [_event(r) for r in rows]
