"""A whole store read in one snapshot, and replaced whole in one transaction.

Mixed into ``SQLStore``; the archive that carries a dump between servers is
``trellis.api.snapshot``'s business, not this module's.

Theory of operation
-------------------
*Which tables.* The tables come from the database's own catalog (the dialect's
``_schema_tables``/``_schema_columns``/``_schema_parents``), not from a list here: a table a
later migration adds is in every snapshot from then on, with no change to this module. The
few tables that are not state are named in ``NOT_STATE``, each with the reason;
``tests/test_snapshot_store.py`` fails when a table or an index column is neither covered nor
named. Tables are restored parents first (foreign keys), and emptied children first.

*Reading.* One read transaction (SQLite: a WAL read snapshot; PostgreSQL: REPEATABLE READ), so
the dump is the state as of one index, whatever commits meanwhile.

*Indexes.* After a restore, no index that a client sees may be lower than one it saw before
(a client that sees an index go backwards must start over, and a parked query waiting for an
index above N must wake). So a restore does not write back the archive's indexes as they
were: every change index in the archive (the columns of ``INDEX_COLUMNS``) is renumbered in
order onto ``G+1 ... G+n``, where ``G`` is the target's current index and ``n`` the number of
distinct indexes in the archive; the restore itself is the write ``R = G+n+1``, which becomes
the global index, and every topic index (each row of ``indexes``, the target's and the
archive's) becomes ``R``. Renumbering keeps every order and equality between indexes
(``CreateIndex < ModifyIndex``, two rows of one write), so the restored state reads as it
did, only later; restoring the same archive twice grows the index by ``n+1`` each time, not
by the archive's index. Compare-and-set with an index read before the restore fails, as it
must: the state it was read from is gone.

*Waking.* The restore records one change, ``(R, ANY, ANY)``: this process's feed publishes it
after the commit and every other process's follower reads it from ``changes``, and a change of
topic ANY wakes every parked query (and tells the DNS name index and the CA's cache to start
over). The per-process caches versioned by topic indexes (ACLs, intentions) see their topic at
``R`` and reload.

*Clocks.* Sessions' and TTL checks' deadlines are wall-clock times from the archive's past:
kept as they were, every TTL session would be invalidated and every TTL check turn critical
on the first reaper round after restoring an old archive. A restore gives each its whole TTL
again from now (as Consul resets session timers after a restore), see ``RESTORE_CLOCKS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trellis.api.feed import ANY, Change
from trellis.api.store.errors import SnapshotRefused

#: Tables that are not part of the state a snapshot carries, and why. Every other table is.
NOT_STATE: Mapping[str, str] = {
    "changes": "the log that carries each write to the other processes' followers; a restore"
    " writes one change that wakes every process instead of the archive's history",
    "members": "which server processes share this store now: the restoring deployment's, not"
    " the archive's (written without an index; nothing watches it)",
    "schema_migrations": "the archive records the schema version, and a restore requires the"
    " same one",
}
#: Columns that hold change indexes (renumbered by a restore; see the module docstring).
INDEX_COLUMNS = frozenset({"create_index", "modify_index", "idx"})
#: Columns named like indexes that are not change indexes: left as they are.
NOT_INDEX_COLUMNS = frozenset(
    {
        "lock_index",  # a K/V key's count of lock acquisitions, not a change index
    }
)
#: The table of topic indexes: all set to the restore's own index.
INDEXES_TABLE = "indexes"
#: Deadlines a restore starts again from now: (table, column, SQL giving its new value from
#: the parameter ``now``, the condition of the rows it applies to).
RESTORE_CLOCKS: tuple[tuple[str, str, str, str], ...] = (
    ("sessions", "expires_at", "? + ttl_seconds", "ttl_seconds > 0"),
    ("checks", "expires_at", "? + ttl", "ttl IS NOT NULL AND expires_at IS NOT NULL"),
)

Row = tuple[Any, ...]


@dataclass(frozen=True)
class StoreDump:
    """A store's state as of one index: per table, in restore order, its columns and rows."""

    schema_version: int
    index: int
    tables: Mapping[str, tuple[tuple[str, ...], Sequence[Row]]]


def _q(name: str) -> str:
    """A table or column name as an SQL identifier (names come from the database's catalog,
    or are checked against it first)."""
    return '"' + name.replace('"', '""') + '"'


def restore_order(parents: Mapping[str, Iterable[str]]) -> list[str]:
    """The tables, parents before children (by foreign key), otherwise by name."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(t: str, path: tuple[str, ...]) -> None:
        if t in seen or t in path:
            return
        for p in sorted(parents.get(t, ())):
            if p != t and p in parents:
                visit(p, (*path, t))
        seen.add(t)
        done.append(t)

    for t in sorted(parents):
        visit(t, ())
    return done


def is_index_like(column: str) -> bool:
    """Whether a column's name says it may hold a change index (the coverage test asks that
    every such column be in ``INDEX_COLUMNS`` or ``NOT_INDEX_COLUMNS``)."""
    return column in ("idx", "index") or column.endswith("_index") or column.endswith("_idx")


class SnapshotStoreMixin:
    """``snapshot_dump`` and ``snapshot_restore`` for ``SQLStore``."""

    # Provided by SQLStore and the dialects.
    read: Callable[..., Any]
    write: Callable[..., Any]
    unavailable_errors: tuple[type[BaseException], ...]
    #: Driver errors that mean "these values do not fit this table" (a restore's 400).
    data_errors: tuple[type[BaseException], ...] = ()

    def _schema_tables(self, q: Callable[..., list[Any]]) -> list[str]:
        raise NotImplementedError

    def _schema_columns(self, q: Callable[..., list[Any]], table: str) -> list[str]:
        raise NotImplementedError

    def _schema_parents(self, q: Callable[..., list[Any]], table: str) -> list[str]:
        raise NotImplementedError

    def _exec_many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def _schema(self, q: Callable[..., list[Any]]) -> tuple[int, dict[str, tuple[str, ...]]]:
        """The schema version and, in restore order, the columns of every table of state."""
        tables = [t for t in self._schema_tables(q) if t not in NOT_STATE]
        parents = {t: self._schema_parents(q, t) for t in tables}
        version = int(q("SELECT max(version) FROM schema_migrations")[0][0] or 0)
        return version, {t: tuple(self._schema_columns(q, t)) for t in restore_order(parents)}

    def snapshot_tables(self) -> dict[str, tuple[str, ...]]:
        """Every table a snapshot holds, with its columns (for tests and tools)."""
        with self.read() as q:
            return self._schema(q)[1]

    def snapshot_dump(self) -> StoreDump:
        """The whole state, read in one snapshot."""
        with self.read() as q:
            version, schema = self._schema(q)
            index = int(q("SELECT idx FROM indexes WHERE name = 'global'")[0][0])
            tables: dict[str, tuple[tuple[str, ...], Sequence[Row]]] = {}
            for t, cols in schema.items():
                select = ", ".join(_q(c) for c in cols)
                rows = [tuple(r) for r in q(f"SELECT {select} FROM {_q(t)}")]  # noqa: S608 - names from the catalog
                tables[t] = (cols, [tuple(_plain(v) for v in r) for r in rows])
        return StoreDump(version, index, tables)

    def snapshot_restore(self, dump: StoreDump, *, now: float) -> int:
        """Replace the whole state with ``dump``, in one write transaction; the restore's
        index (see the module docstring).

        SnapshotRefused (the sender's fault; nothing changed): the dump's schema version,
        tables or columns are not this store's, an index is not a whole number, or its rows
        do not fit the tables (a type the column cannot hold, a duplicate key, a child row
        whose parent is missing).
        """
        with self.write() as tx:

            def q(sql: str, params: Sequence[Any] = ()) -> list[Any]:
                return list(tx.execute(sql, params).fetchall())

            version, schema = self._schema(q)
            _check_shape(dump, version, schema)
            before = int(tx.one("SELECT idx FROM indexes WHERE name = 'global'")[0])
            renumber = _renumbering(dump, before)
            restore = before + len(renumber) + 1
            topics = {r[0] for r in q("SELECT name FROM indexes")}
            try:
                for t in reversed(list(schema)):
                    tx.execute(f"DELETE FROM {_q(t)}")  # noqa: S608 - names from the catalog
                for t in schema:
                    cols, rows = dump.tables[t]
                    if t == INDEXES_TABLE:
                        name_at = cols.index("name")
                        topics |= {str(r[name_at]) for r in rows}
                        continue
                    at = [i for i, c in enumerate(cols) if c in INDEX_COLUMNS]
                    out = [_renumbered(r, at, renumber) for r in rows] if at else rows
                    if out:
                        marks = ", ".join("?" * len(cols))
                        names = ", ".join(_q(c) for c in cols)
                        self._exec_many(
                            tx.conn,
                            f"INSERT INTO {_q(t)} ({names}) VALUES ({marks})",  # noqa: S608
                            out,
                        )
                self._exec_many(
                    tx.conn,
                    "INSERT INTO indexes (name, idx) VALUES (?, ?)",
                    [(name, restore) for name in sorted(topics | {"global"})],
                )
            except self.data_errors as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SnapshotRefused(
                    f"the snapshot's rows do not fit this store: {first[:300]}"
                ) from None
            for table, column, value, where in RESTORE_CLOCKS:
                if table in schema:
                    tx.execute(
                        f"UPDATE {_q(table)} SET {_q(column)} = {value} WHERE {where}",  # noqa: S608
                        (now,),
                    )
            tx.jump_index(restore)
            tx.execute(
                "INSERT INTO changes (idx, topic, key) VALUES (?, ?, ?)", (restore, ANY, ANY)
            )
            tx.changes.append(Change(restore, ANY, ANY))
            return restore


def _plain(v: Any) -> Any:
    """A driver value as a plain Python value (PostgreSQL may hand back a memoryview)."""
    if isinstance(v, memoryview | bytearray):
        return bytes(v)
    return v


def _check_shape(dump: StoreDump, version: int, schema: Mapping[str, tuple[str, ...]]) -> None:
    if dump.schema_version != version:
        raise SnapshotRefused(
            f"the snapshot is of store schema version {dump.schema_version}; this server's"
            f" store is at version {version}: restore it on a server of the same Trellis"
            " version, then upgrade that server"
        )
    missing = sorted(set(schema) - set(dump.tables))
    extra = sorted(set(dump.tables) - set(schema))
    if missing or extra:
        raise SnapshotRefused(
            "the snapshot's tables are not this store's:"
            + (f" missing {', '.join(missing)}" if missing else "")
            + (f" unknown {', '.join(extra)}" if extra else "")
        )
    for t, cols in schema.items():
        if set(dump.tables[t][0]) != set(cols):
            raise SnapshotRefused(
                f"the snapshot's table {t!r} has columns {sorted(dump.tables[t][0])}; this"
                f" store's has {sorted(cols)}"
            )
    if "name" not in dump.tables[INDEXES_TABLE][0]:
        raise SnapshotRefused("the snapshot's table 'indexes' has no 'name'")
    # Every server reads the cluster ID (the trust domain) at start and on every CA change:
    # a store without one would fail them all.
    cols, rows = dump.tables["meta"]
    key, value = cols.index("key"), cols.index("value")
    if not any(r[key] == "cluster_id" and isinstance(r[value], str) and r[value] for r in rows):
        raise SnapshotRefused("the snapshot has no cluster ID (table 'meta', key 'cluster_id')")


def _renumbering(dump: StoreDump, base: int) -> dict[int, int]:
    """Each distinct change index of the dump (but the topic indexes), in order, onto
    ``base+1, base+2, ...``."""
    seen: set[int] = set()
    for t, (cols, rows) in dump.tables.items():
        if t == INDEXES_TABLE:
            continue
        for i, c in enumerate(cols):
            if c not in INDEX_COLUMNS:
                continue
            for r in rows:
                v = r[i]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise SnapshotRefused(
                        f"the snapshot's {t}.{c} holds {str(v)[:40]!r}, not an index"
                    )
                seen.add(v)
    return {v: base + n for n, v in enumerate(sorted(seen), start=1)}


def _renumbered(row: Row, at: Sequence[int], renumber: Mapping[int, int]) -> Row:
    out = list(row)
    for i in at:
        out[i] = renumber[out[i]]
    return tuple(out)
