"""Intentions and ACL objects in the store: value objects and the SQL that keeps them.

Mixed into ``SQLStore``; uses only its ``read``/``write`` plumbing, so both databases run it.
Intention writes touch topic ``intentions`` with the destination as key (a sidecar watches its
own destination); ACL writes touch topic ``acl``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trellis.api.store.errors import NotFoundInStore, StoreConflict

INTENTION_COLS = (
    "id, source, destination, action, description, meta, created_at, updated_at,"
    " create_index, modify_index"
)
TOKEN_COLS = (  # column names, not a secret
    "accessor_id, secret_hash, description, policies, is_local, create_time, create_index,"  # noqa: S105
    " modify_index"
)
POLICY_COLS = "id, name, description, rules, datacenters, create_index, modify_index"


@dataclass(frozen=True)
class IntentionRecord:
    id: str
    source: str
    destination: str
    action: str
    description: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class TokenLogin:
    """What a token made by ``acl/login`` has beyond an ordinary token (its own table,
    ``acl_token_logins``: ``trellis.api.store.logins``): the method that made it, its expiry
    (``expires_at``: epoch seconds, None for never) and what its binding rules bound it to,
    as data the ACL cache turns into rules (``("service", "web")``, ``("node", "n1")``)."""

    auth_method: str
    expiration_time: str = ""
    expires_at: float | None = None
    binds: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ACLToken:
    accessor_id: str
    #: SHA-256 of the secret: the secret itself is never stored.
    secret_hash: str
    description: str = ""
    policies: tuple[str, ...] = ()
    local: bool = False
    create_time: str = ""
    create_index: int = 0
    modify_index: int = 0
    #: Set for a token made by ``acl/login`` (read from ``acl_token_logins``).
    login: TokenLogin | None = None


@dataclass(frozen=True)
class ACLPolicy:
    id: str
    name: str
    description: str = ""
    rules: str = ""
    datacenters: tuple[str, ...] = ()
    create_index: int = 0
    modify_index: int = 0


def _intention(r: Sequence[Any]) -> IntentionRecord:
    return IntentionRecord(
        id=r[0],
        source=r[1],
        destination=r[2],
        action=r[3],
        description=r[4],
        meta=json.loads(r[5] or "{}"),
        created_at=r[6],
        updated_at=r[7],
        create_index=int(r[8]),
        modify_index=int(r[9]),
    )


def _token(r: Sequence[Any]) -> ACLToken:
    return ACLToken(
        accessor_id=r[0],
        secret_hash=r[1],
        description=r[2],
        policies=tuple(json.loads(r[3] or "[]")),
        local=bool(r[4]),
        create_time=r[5],
        create_index=int(r[6]),
        modify_index=int(r[7]),
    )


LOGIN_COLS = "accessor_id, auth_method, expiration_time, expires_at, binds"


def _login(r: Sequence[Any]) -> TokenLogin:
    return TokenLogin(
        auth_method=r[1],
        expiration_time=r[2],
        expires_at=None if r[3] is None else float(r[3]),
        binds=tuple((str(t), str(n)) for t, n in json.loads(r[4] or "[]")),
    )


def _with_login(q: Any, token: ACLToken) -> ACLToken:
    """``token`` with its login row (if any) attached, read through ``q`` (the caller's
    snapshot)."""
    sql = f"SELECT {LOGIN_COLS} FROM acl_token_logins WHERE accessor_id = ?"  # noqa: S608
    rows = q(sql, (token.accessor_id,))
    return dataclasses.replace(token, login=_login(rows[0])) if rows else token


def _policy(r: Sequence[Any]) -> ACLPolicy:
    return ACLPolicy(
        id=r[0],
        name=r[1],
        description=r[2],
        rules=r[3],
        datacenters=tuple(json.loads(r[4] or "[]")),
        create_index=int(r[5]),
        modify_index=int(r[6]),
    )


MIGRATION = [
    "CREATE TABLE intentions (id TEXT PRIMARY KEY, source TEXT NOT NULL,"
    " destination TEXT NOT NULL, action TEXT NOT NULL, description TEXT NOT NULL,"
    " meta TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,"
    " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL,"
    " UNIQUE (source, destination))",
    "CREATE INDEX intentions_by_destination ON intentions (destination)",
    "CREATE TABLE acl_policies (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    " description TEXT NOT NULL, rules TEXT NOT NULL, datacenters TEXT NOT NULL,"
    " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
    "CREATE TABLE acl_tokens (accessor_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE,"
    " description TEXT NOT NULL, policies TEXT NOT NULL, is_local INTEGER NOT NULL,"
    " create_time TEXT NOT NULL, create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
]


class SecurityStoreMixin:
    """Intentions and ACL tables. ``self`` is a ``SQLStore``."""

    # -- intentions ----------------------------------------------------------------------------

    def intentions(self) -> list[IntentionRecord]:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {INTENTION_COLS} FROM intentions ORDER BY source, destination")  # noqa: S608
        return [_intention(r) for r in rows]

    def intentions_at(self) -> tuple[list[IntentionRecord], int]:
        """Every intention and the ``intentions`` topic index, read from one snapshot: the
        index is that of the newest intention write the list reflects."""
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {INTENTION_COLS} FROM intentions ORDER BY source, destination")  # noqa: S608
            idx = q("SELECT idx FROM indexes WHERE name = 'intentions'")
        return [_intention(r) for r in rows], int(idx[0][0]) if idx else 0

    def intention(self, intention_id: str) -> IntentionRecord | None:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {INTENTION_COLS} FROM intentions WHERE id = ?", (intention_id,))  # noqa: S608
        return _intention(rows[0]) if rows else None

    def intention_exact(self, source: str, destination: str) -> IntentionRecord | None:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(
                f"SELECT {INTENTION_COLS} FROM intentions WHERE source = ? AND destination = ?",  # noqa: S608
                (source, destination),
            )
        return _intention(rows[0]) if rows else None

    def intention_put(
        self, rec: IntentionRecord, *, create_only: bool = False, expect_id: str | None = None
    ) -> IntentionRecord:
        """Create or replace the intention for ``(rec.source, rec.destination)``.

        ``create_only``: StoreConflict if that pair has an intention already. ``expect_id``:
        update the intention with this ID (NotFoundInStore if it is gone); StoreConflict if the
        new pair belongs to another intention. Timestamps are the caller's.
        """
        with self.write() as tx:  # type: ignore[attr-defined]
            pair = tx.one(
                "SELECT id, created_at, create_index, destination FROM intentions"
                " WHERE source = ? AND destination = ?",
                (rec.source, rec.destination),
            )
            old_dest = None
            created_at, create_index, rid = rec.created_at, None, rec.id
            if expect_id is not None:
                cur = tx.one(
                    "SELECT id, created_at, create_index, destination FROM intentions WHERE id = ?",
                    (expect_id,),
                )
                if cur is None:
                    raise NotFoundInStore(f"intention {expect_id} not found")
                if pair is not None and pair[0] != expect_id:
                    raise StoreConflict(
                        f"an intention {rec.source} => {rec.destination} already exists"
                    )
                rid, created_at, create_index, old_dest = cur[0], cur[1], int(cur[2]), cur[3]
            elif pair is not None:
                if create_only:
                    raise StoreConflict(
                        f"an intention {rec.source} => {rec.destination} already exists"
                    )
                rid, created_at, create_index = pair[0], pair[1], int(pair[2])
            idx = tx.index
            create_index = create_index or idx
            tx.execute("DELETE FROM intentions WHERE id = ?", (rid,))
            tx.execute(
                f"INSERT INTO intentions ({INTENTION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    rid,
                    rec.source,
                    rec.destination,
                    rec.action,
                    rec.description,
                    json.dumps(dict(rec.meta), sort_keys=True),
                    created_at,
                    rec.updated_at,
                    create_index,
                    idx,
                ),
            )
            tx.touch("intentions", rec.destination)
            if old_dest and old_dest != rec.destination:
                tx.touch("intentions", old_dest)
            row = tx.one(f"SELECT {INTENTION_COLS} FROM intentions WHERE id = ?", (rid,))  # noqa: S608
            return _intention(row)

    def intention_delete(self, intention_id: str) -> bool:
        with self.write() as tx:  # type: ignore[attr-defined]
            row = tx.one("SELECT destination FROM intentions WHERE id = ?", (intention_id,))
            if row is None:
                return False
            tx.execute("DELETE FROM intentions WHERE id = ?", (intention_id,))
            tx.touch("intentions", row[0])
            return True

    # -- ACL ---------------------------------------------------------------------------------------

    def acl_tokens(self) -> list[ACLToken]:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {TOKEN_COLS} FROM acl_tokens ORDER BY create_index, accessor_id")  # noqa: S608
            logins = {r[0]: _login(r) for r in q(f"SELECT {LOGIN_COLS} FROM acl_token_logins")}  # noqa: S608
        return [dataclasses.replace(t, login=logins.get(t.accessor_id)) for t in map(_token, rows)]

    def acl_token(
        self, *, accessor_id: str | None = None, secret_hash: str | None = None
    ) -> ACLToken | None:
        col, val = (
            ("accessor_id", accessor_id)
            if accessor_id is not None
            else (
                "secret_hash",
                secret_hash,
            )
        )
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE {col} = ?", (val,))  # noqa: S608
            return _with_login(q, _token(rows[0])) if rows else None

    def acl_resolve(self, secret_hash: str) -> tuple[ACLToken | None, list[ACLPolicy], int]:
        """The token with this secret hash (None if there is none), its policies (in the
        token's order; a deleted one is left out) and the ``acl`` topic index, all read from
        one snapshot: the index is that of the newest ACL write the answer reflects."""
        with self.read() as q:  # type: ignore[attr-defined]
            idx = q("SELECT idx FROM indexes WHERE name = 'acl'")
            index = int(idx[0][0]) if idx else 0
            rows = q(f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE secret_hash = ?", (secret_hash,))  # noqa: S608
            if not rows:
                return None, [], index
            token = _with_login(q, _token(rows[0]))
            if not token.policies:
                return token, [], index
            marks = ",".join("?" * len(token.policies))
            sql = f"SELECT {POLICY_COLS} FROM acl_policies WHERE id IN ({marks})"  # noqa: S608 - only placeholders
            found = {p.id: p for p in map(_policy, q(sql, token.policies))}
        return token, [found[pid] for pid in token.policies if pid in found], index

    def acl_token_put(self, t: ACLToken, *, create: bool) -> ACLToken | None:
        """Create (StoreConflict if the accessor or secret exists) or update (None if
        missing)."""
        with self.write() as tx:  # type: ignore[attr-defined]
            cur = tx.one(
                "SELECT create_index, secret_hash, create_time FROM acl_tokens"
                " WHERE accessor_id = ?",
                (t.accessor_id,),
            )
            if create:
                if cur is not None:
                    raise StoreConflict("a token with this AccessorID exists")
                if tx.one(
                    "SELECT accessor_id FROM acl_tokens WHERE secret_hash = ?", (t.secret_hash,)
                ):
                    raise StoreConflict("a token with this SecretID exists")
            elif cur is None:
                return None
            idx = tx.index
            create_index = idx if cur is None else int(cur[0])
            secret_hash = t.secret_hash if cur is None else cur[1]
            create_time = t.create_time if cur is None else cur[2]
            tx.execute("DELETE FROM acl_tokens WHERE accessor_id = ?", (t.accessor_id,))
            tx.execute(
                f"INSERT INTO acl_tokens ({TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    t.accessor_id,
                    secret_hash,
                    t.description,
                    json.dumps(list(t.policies)),
                    int(t.local),
                    create_time,
                    create_index,
                    idx,
                ),
            )
            tx.touch("acl", "tokens")
            row = tx.one(
                f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE accessor_id = ?",  # noqa: S608
                (t.accessor_id,),
            )
            return _token(row)

    def acl_token_delete(self, accessor_id: str) -> bool:
        with self.write() as tx:  # type: ignore[attr-defined]
            if tx.one("SELECT 1 FROM acl_tokens WHERE accessor_id = ?", (accessor_id,)) is None:
                return False
            tx.execute("DELETE FROM acl_tokens WHERE accessor_id = ?", (accessor_id,))
            tx.execute("DELETE FROM acl_token_logins WHERE accessor_id = ?", (accessor_id,))
            tx.touch("acl", "tokens")
            return True

    def acl_policies(self) -> list[ACLPolicy]:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {POLICY_COLS} FROM acl_policies ORDER BY name")  # noqa: S608
        return [_policy(r) for r in rows]

    def acl_policy(
        self, *, policy_id: str | None = None, name: str | None = None
    ) -> ACLPolicy | None:
        col, val = ("id", policy_id) if policy_id is not None else ("name", name)
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {POLICY_COLS} FROM acl_policies WHERE {col} = ?", (val,))  # noqa: S608
        return _policy(rows[0]) if rows else None

    def acl_policy_put(self, p: ACLPolicy, *, create: bool) -> ACLPolicy | None:
        """Create (StoreConflict if the ID exists) or update (None if missing); StoreConflict
        if another policy has the name."""
        with self.write() as tx:  # type: ignore[attr-defined]
            cur = tx.one("SELECT create_index FROM acl_policies WHERE id = ?", (p.id,))
            if create and cur is not None:
                raise StoreConflict("a policy with this ID exists")
            if not create and cur is None:
                return None
            other = tx.one("SELECT id FROM acl_policies WHERE name = ?", (p.name,))
            if other is not None and other[0] != p.id:
                raise StoreConflict(f"a policy named {p.name!r} exists")
            idx = tx.index
            create_index = idx if cur is None else int(cur[0])
            tx.execute("DELETE FROM acl_policies WHERE id = ?", (p.id,))
            tx.execute(
                f"INSERT INTO acl_policies ({POLICY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    p.id,
                    p.name,
                    p.description,
                    p.rules,
                    json.dumps(list(p.datacenters)),
                    create_index,
                    idx,
                ),
            )
            tx.touch("acl", "policies")
            row = tx.one(f"SELECT {POLICY_COLS} FROM acl_policies WHERE id = ?", (p.id,))  # noqa: S608
            return _policy(row)

    def acl_policy_delete(self, policy_id: str) -> bool:
        with self.write() as tx:  # type: ignore[attr-defined]
            if tx.one("SELECT 1 FROM acl_policies WHERE id = ?", (policy_id,)) is None:
                return False
            tx.execute("DELETE FROM acl_policies WHERE id = ?", (policy_id,))
            tx.touch("acl", "policies")
            return True
