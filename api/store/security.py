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

from trellis.api.acl import identities as ids
from trellis.api.store.errors import NotFoundInStore, StoreConflict

INTENTION_COLS = (
    "id, source, destination, action, description, meta, created_at, updated_at,"
    " create_index, modify_index"
)
TOKEN_COLS = (  # column names, not a secret
    "accessor_id, secret_hash, description, policies, is_local, create_time, create_index,"  # noqa: S105
    " modify_index"
    # Roles, identities, templated policies and expiry (migration 7, ROLES_MIGRATION).
    ", roles, identities, expires_at"
)
POLICY_COLS = "id, name, description, rules, datacenters, create_index, modify_index"
ROLE_COLS = "id, name, description, policies, identities, create_index, modify_index"
#: The keys of a token's or role's ``identities``, in Consul's JSON shapes.
IDENTITY_KEYS = ("ServiceIdentities", "NodeIdentities", "TemplatedPolicies")


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
    #: IDs of the roles the token holds (a deleted role grants nothing).
    roles: tuple[str, ...] = ()
    #: ``ServiceIdentities``, ``NodeIdentities`` and ``TemplatedPolicies`` as Consul shapes
    #: them (``trellis.api.acl.identities`` turns them into rules); empty lists left out.
    identities: Mapping[str, Any] = field(default_factory=dict)
    #: Epoch seconds after which the token no longer works (None: never expires).
    expires_at: float | None = None

    #: Set for a token made by ``acl/login`` (read from ``acl_token_logins``).
    login: TokenLogin | None = None


@dataclass(frozen=True)
class ACLRole:
    """A named set of policies and identities that tokens hold by reference."""

    id: str
    name: str
    description: str = ""
    policies: tuple[str, ...] = ()
    identities: Mapping[str, Any] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


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
        roles=tuple(json.loads(r[8] or "[]")),
        identities=json.loads(r[9] or "{}"),
        expires_at=None if r[10] is None else float(r[10]),
    )


def _role(r: Sequence[Any]) -> ACLRole:
    return ACLRole(
        id=r[0],
        name=r[1],
        description=r[2],
        policies=tuple(json.loads(r[3] or "[]")),
        identities=json.loads(r[4] or "{}"),
        create_index=int(r[5]),
        modify_index=int(r[6]),
    )


def synthetic_policies(owner: str, identities: Mapping[str, Any]) -> list[ACLPolicy]:
    """The policies a token's or role's identities and templated policies grant, made from
    Consul's templates (``trellis.api.acl.identities``). ``owner`` names them for logs."""
    out = []
    for i in identities.get("ServiceIdentities", ()):
        out.append(_synthetic(owner, ids.service_rules(i["ServiceName"])))
    for i in identities.get("NodeIdentities", ()):
        out.append(_synthetic(owner, ids.node_rules(i["NodeName"])))
    for i in identities.get("TemplatedPolicies", ()):
        rules = ids.templated_rules(i["TemplateName"], i.get("TemplateVariables") or {})
        out.append(_synthetic(owner, rules))
    return out


def _synthetic(owner: str, rules: str) -> ACLPolicy:
    return ACLPolicy(id="", name=f"synthetic-policy-{owner}", rules=rules)


#: Rules no parser accepts: what an identity the templates cannot render (a damaged store:
#: they are checked on write) resolves to, so the authorizer denies everything rather than
#: dropping the identity's rules silently.
DAMAGED_RULES = "# damaged identity\n{"


def _granted(owner: str, identities: Mapping[str, Any]) -> list[ACLPolicy]:
    try:
        return synthetic_policies(owner, identities)
    except (ids.IdentityError, KeyError, TypeError, AttributeError):
        return [_synthetic(owner, DAMAGED_RULES)]


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

#: Roles, and what tokens gained with them: roles, identities, templated policies, expiry.
ROLES_MIGRATION = [
    "CREATE TABLE acl_roles (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    " description TEXT NOT NULL, policies TEXT NOT NULL, identities TEXT NOT NULL,"
    " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
    "ALTER TABLE acl_tokens ADD COLUMN roles TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE acl_tokens ADD COLUMN identities TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE acl_tokens ADD COLUMN expires_at DOUBLE PRECISION",
    "CREATE INDEX acl_tokens_by_expiry ON acl_tokens (expires_at)",
    # Accessors are looked up whatever their case (``acl_token``).
    "CREATE UNIQUE INDEX acl_tokens_by_accessor_any_case ON acl_tokens (lower(accessor_id))",
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
        """By accessor (whatever its case: Consul's accessor index ignores it, and the ID
        keeps the case it was given) or by secret hash."""
        val: str | None
        if accessor_id is not None:
            where, val = "lower(accessor_id) = lower(?)", accessor_id
        else:
            where, val = "secret_hash = ?", secret_hash
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE {where}", (val,))  # noqa: S608
            return _with_login(q, _token(rows[0])) if rows else None

    def acl_resolve(self, secret_hash: str) -> tuple[ACLToken | None, list[ACLPolicy], int]:
        """The token with this secret hash (None if there is none), the policies it is
        granted, and the ``acl`` topic index, all read from one snapshot: the index is that of
        the newest ACL write the answer reflects.

        The policies are the token's own (in its order; a deleted one is left out), then those
        of its roles, then synthetic ones made from the token's and its roles' identities and
        templated policies (``synthetic_policies``). Expiry is the caller's to check."""
        with self.read() as q:  # type: ignore[attr-defined]
            idx = q("SELECT idx FROM indexes WHERE name = 'acl'")
            index = int(idx[0][0]) if idx else 0
            rows = q(f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE secret_hash = ?", (secret_hash,))  # noqa: S608
            if not rows:
                return None, [], index
            token = _with_login(q, _token(rows[0]))
            roles: list[ACLRole] = []
            if token.roles:
                marks = ",".join("?" * len(token.roles))
                sql = f"SELECT {ROLE_COLS} FROM acl_roles WHERE id IN ({marks})"  # noqa: S608 - only placeholders
                found_roles = {r.id: r for r in map(_role, q(sql, token.roles))}
                roles = [found_roles[rid] for rid in token.roles if rid in found_roles]
            wanted: list[str] = list(token.policies)
            for role in roles:
                wanted += [pid for pid in role.policies if pid not in wanted]
            found: dict[str, ACLPolicy] = {}
            if wanted:
                marks = ",".join("?" * len(wanted))
                sql = f"SELECT {POLICY_COLS} FROM acl_policies WHERE id IN ({marks})"  # noqa: S608 - only placeholders
                found = {p.id: p for p in map(_policy, q(sql, wanted))}
        policies = [found[pid] for pid in wanted if pid in found]
        policies += _granted(token.accessor_id, token.identities)
        for role in roles:
            policies += _granted(role.id, role.identities)
        return token, policies, index

    def acl_token_put(self, t: ACLToken, *, create: bool) -> ACLToken | None:
        """Create (StoreConflict if the accessor, in any case, or the secret exists) or update
        (None if missing; the accessor keeps the case it was created with, and the secret and
        the expiry never change)."""
        with self.write() as tx:  # type: ignore[attr-defined]
            cur = tx.one(
                "SELECT create_index, secret_hash, create_time, accessor_id, expires_at"
                " FROM acl_tokens WHERE lower(accessor_id) = lower(?)",
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
            accessor = t.accessor_id if cur is None else cur[3]
            expires_at = t.expires_at if cur is None else cur[4]
            tx.execute("DELETE FROM acl_tokens WHERE accessor_id = ?", (accessor,))
            tx.execute(
                f"INSERT INTO acl_tokens ({TOKEN_COLS})"  # noqa: S608
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    accessor,
                    secret_hash,
                    t.description,
                    json.dumps(list(t.policies)),
                    int(t.local),
                    create_time,
                    create_index,
                    idx,
                    json.dumps(list(t.roles)),
                    json.dumps(dict(t.identities)),
                    expires_at,
                ),
            )
            tx.touch("acl", "tokens")
            row = tx.one(
                f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE accessor_id = ?",  # noqa: S608
                (accessor,),
            )
            return _token(row)

    def acl_token_delete(self, accessor_id: str) -> bool:
        with self.write() as tx:  # type: ignore[attr-defined]
            row = tx.one(
                "SELECT accessor_id FROM acl_tokens WHERE lower(accessor_id) = lower(?)",
                (accessor_id,),
            )
            if row is None:
                return False
            tx.execute("DELETE FROM acl_tokens WHERE accessor_id = ?", (row[0],))
            tx.execute("DELETE FROM acl_token_logins WHERE accessor_id = ?", (row[0],))
            tx.touch("acl", "tokens")
            return True

    def acl_expire_tokens(self, now: float) -> int:
        """Delete the tokens whose expiry is at or before ``now``; how many. They stopped
        working at that moment already (the resolver checks the expiry); this only reaps
        them, in the one process that holds the reaper role."""
        with self.write() as tx:  # type: ignore[attr-defined]
            due = [
                r[0]
                for r in tx.execute(
                    "SELECT accessor_id FROM acl_tokens"
                    " WHERE expires_at IS NOT NULL AND expires_at <= ?",
                    (now,),
                ).fetchall()
            ]
            if not due:
                return 0
            tx.execute(
                "DELETE FROM acl_tokens WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            )
            tx.touch("acl", "tokens")
            return len(due)

    # -- roles -----------------------------------------------------------------------------------

    def acl_roles(self) -> list[ACLRole]:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {ROLE_COLS} FROM acl_roles ORDER BY name")  # noqa: S608
        return [_role(r) for r in rows]

    def acl_role(self, *, role_id: str | None = None, name: str | None = None) -> ACLRole | None:
        col, val = ("id", role_id) if role_id is not None else ("name", name)
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {ROLE_COLS} FROM acl_roles WHERE {col} = ?", (val,))  # noqa: S608
        return _role(rows[0]) if rows else None

    def acl_role_put(self, r: ACLRole, *, create: bool) -> ACLRole | None:
        """Create (StoreConflict if the ID exists) or update (None if missing); StoreConflict
        if another role has the name."""
        with self.write() as tx:  # type: ignore[attr-defined]
            cur = tx.one("SELECT create_index FROM acl_roles WHERE id = ?", (r.id,))
            if create and cur is not None:
                raise StoreConflict("a role with this ID exists")
            if not create and cur is None:
                return None
            other = tx.one("SELECT id FROM acl_roles WHERE name = ?", (r.name,))
            if other is not None and other[0] != r.id:
                raise StoreConflict(f"a role named {r.name!r} exists")
            idx = tx.index
            create_index = idx if cur is None else int(cur[0])
            tx.execute("DELETE FROM acl_roles WHERE id = ?", (r.id,))
            tx.execute(
                f"INSERT INTO acl_roles ({ROLE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    r.id,
                    r.name,
                    r.description,
                    json.dumps(list(r.policies)),
                    json.dumps(dict(r.identities)),
                    create_index,
                    idx,
                ),
            )
            tx.touch("acl", "roles")
            row = tx.one(f"SELECT {ROLE_COLS} FROM acl_roles WHERE id = ?", (r.id,))  # noqa: S608
            return _role(row)

    def acl_role_delete(self, role_id: str) -> bool:
        """Delete a role; tokens that named it keep the ID, which then grants nothing."""
        with self.write() as tx:  # type: ignore[attr-defined]
            if tx.one("SELECT 1 FROM acl_roles WHERE id = ?", (role_id,)) is None:
                return False
            tx.execute("DELETE FROM acl_roles WHERE id = ?", (role_id,))
            tx.touch("acl", "roles")
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
