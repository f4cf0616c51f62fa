"""Auth methods, binding rules and the tokens made by ``acl/login``, in the store.

Mixed into ``SQLStore`` beside ``SecurityStoreMixin``. Every write touches topic ``acl`` (the
ACL cache's version, ``trellis.api.acl.cache``). A login token is an ordinary ``acl_tokens``
row plus one ``acl_token_logins`` row (the method that made it, when it expires, and what its
binding rules bound it to as data: ``[["service", "web"], ["node", "n1"]]``), written in one
transaction so that no process ever sees the token without its expiry. The side table keeps
``acl_tokens`` as it is (another change adds roles and identities to it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from trellis.api.store.errors import StoreConflict
from trellis.api.store.security import LOGIN_COLS, TOKEN_COLS, ACLToken, TokenLogin, _token

METHOD_COLS = (
    "name, type, display_name, description, max_token_ttl, token_locality, config,"
    " create_index, modify_index"
)
RULE_COLS = (
    "id, auth_method, description, selector, bind_type, bind_name, create_index, modify_index"
)
MIGRATION = [
    "CREATE TABLE acl_auth_methods (name TEXT PRIMARY KEY, type TEXT NOT NULL,"
    " display_name TEXT NOT NULL, description TEXT NOT NULL,"
    " max_token_ttl DOUBLE PRECISION NOT NULL, token_locality TEXT NOT NULL,"
    " config TEXT NOT NULL, create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
    "CREATE TABLE acl_binding_rules (id TEXT PRIMARY KEY, auth_method TEXT NOT NULL,"
    " description TEXT NOT NULL, selector TEXT NOT NULL, bind_type TEXT NOT NULL,"
    " bind_name TEXT NOT NULL, create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
    "CREATE INDEX acl_binding_rules_by_method ON acl_binding_rules (auth_method)",
    "CREATE TABLE acl_token_logins (accessor_id TEXT PRIMARY KEY, auth_method TEXT NOT NULL,"
    " expiration_time TEXT NOT NULL, expires_at DOUBLE PRECISION, binds TEXT NOT NULL)",
    "CREATE INDEX acl_token_logins_by_method ON acl_token_logins (auth_method)",
    "CREATE INDEX acl_token_logins_by_expiry ON acl_token_logins (expires_at)",
]


@dataclass(frozen=True)
class AuthMethod:
    name: str
    type: str
    display_name: str = ""
    description: str = ""
    #: Seconds; 0: login tokens do not expire.
    max_token_ttl: float = 0.0
    token_locality: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class BindingRule:
    id: str
    auth_method: str
    description: str = ""
    selector: str = ""
    bind_type: str = ""
    bind_name: str = ""
    create_index: int = 0
    modify_index: int = 0


def _method(r: Sequence[Any]) -> AuthMethod:
    return AuthMethod(
        name=r[0],
        type=r[1],
        display_name=r[2],
        description=r[3],
        max_token_ttl=float(r[4]),
        token_locality=r[5],
        config=json.loads(r[6] or "{}"),
        create_index=int(r[7]),
        modify_index=int(r[8]),
    )


def _rule(r: Sequence[Any]) -> BindingRule:
    return BindingRule(
        id=r[0],
        auth_method=r[1],
        description=r[2],
        selector=r[3],
        bind_type=r[4],
        bind_name=r[5],
        create_index=int(r[6]),
        modify_index=int(r[7]),
    )


class LoginStoreMixin:
    """Auth methods, binding rules, login tokens. ``self`` is a ``SQLStore``."""

    # -- auth methods ----------------------------------------------------------------------------

    def acl_auth_methods(self) -> list[AuthMethod]:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {METHOD_COLS} FROM acl_auth_methods ORDER BY name")  # noqa: S608
        return [_method(r) for r in rows]

    def acl_auth_method(self, name: str) -> AuthMethod | None:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {METHOD_COLS} FROM acl_auth_methods WHERE name = ?", (name,))  # noqa: S608
        return _method(rows[0]) if rows else None

    def acl_auth_method_put(self, m: AuthMethod, *, create: bool) -> AuthMethod | None:
        """Create (StoreConflict if the name exists) or update (None if missing); the type of
        an existing method cannot change (StoreConflict)."""
        with self.write() as tx:  # type: ignore[attr-defined]
            cur = tx.one(
                "SELECT create_index, type FROM acl_auth_methods WHERE name = ?", (m.name,)
            )
            if create and cur is not None:
                raise StoreConflict(f"an auth method named {m.name!r} exists")
            if not create and cur is None:
                return None
            if cur is not None and cur[1] != m.type:
                raise StoreConflict("an auth method's Type cannot be changed")
            idx = tx.index
            tx.execute("DELETE FROM acl_auth_methods WHERE name = ?", (m.name,))
            tx.execute(
                f"INSERT INTO acl_auth_methods ({METHOD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    m.name,
                    m.type,
                    m.display_name,
                    m.description,
                    m.max_token_ttl,
                    m.token_locality,
                    json.dumps(m.config, sort_keys=True),
                    idx if cur is None else int(cur[0]),
                    idx,
                ),
            )
            tx.touch("acl", "auth-methods")
            row = tx.one(f"SELECT {METHOD_COLS} FROM acl_auth_methods WHERE name = ?", (m.name,))  # noqa: S608
            return _method(row)

    def acl_auth_method_delete(self, name: str) -> bool:
        """Delete a method, its binding rules and every token it made (as Consul does)."""
        with self.write() as tx:  # type: ignore[attr-defined]
            if tx.one("SELECT 1 FROM acl_auth_methods WHERE name = ?", (name,)) is None:
                return False
            tx.execute(
                "DELETE FROM acl_tokens WHERE accessor_id IN"
                " (SELECT accessor_id FROM acl_token_logins WHERE auth_method = ?)",
                (name,),
            )
            tx.execute("DELETE FROM acl_token_logins WHERE auth_method = ?", (name,))
            tx.execute("DELETE FROM acl_binding_rules WHERE auth_method = ?", (name,))
            tx.execute("DELETE FROM acl_auth_methods WHERE name = ?", (name,))
            tx.touch("acl", "auth-methods")
            return True

    # -- binding rules ---------------------------------------------------------------------------

    def acl_binding_rules(self, auth_method: str | None = None) -> list[BindingRule]:
        with self.read() as q:  # type: ignore[attr-defined]
            if auth_method is None:
                rows = q(f"SELECT {RULE_COLS} FROM acl_binding_rules ORDER BY create_index, id")  # noqa: S608
            else:
                rows = q(
                    f"SELECT {RULE_COLS} FROM acl_binding_rules WHERE auth_method = ?"  # noqa: S608
                    " ORDER BY create_index, id",
                    (auth_method,),
                )
        return [_rule(r) for r in rows]

    def acl_binding_rule(self, rule_id: str) -> BindingRule | None:
        with self.read() as q:  # type: ignore[attr-defined]
            rows = q(f"SELECT {RULE_COLS} FROM acl_binding_rules WHERE id = ?", (rule_id,))  # noqa: S608
        return _rule(rows[0]) if rows else None

    def acl_binding_rule_put(self, b: BindingRule, *, create: bool) -> BindingRule | None:
        """Create (StoreConflict if the ID exists) or update (None if missing). StoreConflict
        if the auth method is gone, or an update moves the rule to another method."""
        with self.write() as tx:  # type: ignore[attr-defined]
            cur = tx.one(
                "SELECT create_index, auth_method FROM acl_binding_rules WHERE id = ?", (b.id,)
            )
            if create and cur is not None:
                raise StoreConflict("a binding rule with this ID exists")
            if not create and cur is None:
                return None
            if cur is not None and cur[1] != b.auth_method:
                raise StoreConflict("a binding rule's AuthMethod cannot be changed")
            if tx.one("SELECT 1 FROM acl_auth_methods WHERE name = ?", (b.auth_method,)) is None:
                raise StoreConflict(f"no auth method named {b.auth_method!r}")
            idx = tx.index
            tx.execute("DELETE FROM acl_binding_rules WHERE id = ?", (b.id,))
            tx.execute(
                f"INSERT INTO acl_binding_rules ({RULE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    b.id,
                    b.auth_method,
                    b.description,
                    b.selector,
                    b.bind_type,
                    b.bind_name,
                    idx if cur is None else int(cur[0]),
                    idx,
                ),
            )
            tx.touch("acl", "binding-rules")
            row = tx.one(f"SELECT {RULE_COLS} FROM acl_binding_rules WHERE id = ?", (b.id,))  # noqa: S608
            return _rule(row)

    def acl_binding_rule_delete(self, rule_id: str) -> bool:
        with self.write() as tx:  # type: ignore[attr-defined]
            if tx.one("SELECT 1 FROM acl_binding_rules WHERE id = ?", (rule_id,)) is None:
                return False
            tx.execute("DELETE FROM acl_binding_rules WHERE id = ?", (rule_id,))
            tx.touch("acl", "binding-rules")
            return True

    # -- login tokens ----------------------------------------------------------------------------

    def acl_login_token_put(self, t: ACLToken, login: TokenLogin) -> ACLToken:
        """Make a login token and its login row in one transaction. StoreConflict if the
        method was deleted meanwhile, or the accessor or secret exists."""
        with self.write() as tx:  # type: ignore[attr-defined]
            if (
                tx.one("SELECT 1 FROM acl_auth_methods WHERE name = ?", (login.auth_method,))
                is None
            ):
                raise StoreConflict(f"no auth method named {login.auth_method!r}")
            if tx.one(
                "SELECT 1 FROM acl_tokens WHERE accessor_id = ? OR secret_hash = ?",
                (t.accessor_id, t.secret_hash),
            ):
                raise StoreConflict("a token with this AccessorID or SecretID exists")
            idx = tx.index
            tx.execute(
                f"INSERT INTO acl_tokens ({TOKEN_COLS})"  # noqa: S608
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    t.accessor_id,
                    t.secret_hash,
                    t.description,
                    json.dumps(list(t.policies)),
                    int(t.local),
                    t.create_time,
                    idx,
                    idx,
                    # No roles or identities of its own (what login bound is in its login
                    # row), and its expiry is the login row's: acl_login_tokens_reap deletes
                    # both rows together.
                    "[]",
                    "{}",
                    None,
                ),
            )
            tx.execute(
                f"INSERT INTO acl_token_logins ({LOGIN_COLS}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
                (
                    t.accessor_id,
                    login.auth_method,
                    login.expiration_time,
                    login.expires_at,
                    json.dumps([list(b) for b in login.binds]),
                ),
            )
            tx.touch("acl", "tokens")
            sql = f"SELECT {TOKEN_COLS} FROM acl_tokens WHERE accessor_id = ?"  # noqa: S608
            row = tx.one(sql, (t.accessor_id,))
            return replace(_token(row), login=login)

    def acl_login_tokens_reap(self, now: float) -> int:
        """Delete the login tokens that expired by ``now`` (epoch seconds); how many. They
        stopped working at their expiry already (the ACL cache checks it on every resolve):
        this only keeps them from piling up in the store and in token lists."""
        sql = (
            "SELECT accessor_id FROM acl_token_logins"
            " WHERE expires_at IS NOT NULL AND expires_at <= ?"
        )
        with self.read() as q:  # type: ignore[attr-defined]
            if not q(sql, (now,)):
                return 0  # the usual case: no write transaction every round
        with self.write() as tx:  # type: ignore[attr-defined]
            rows = tx.execute(sql, (now,)).fetchall()
            if not rows:
                return 0
            for (accessor,) in rows:
                tx.execute("DELETE FROM acl_tokens WHERE accessor_id = ?", (accessor,))
                tx.execute("DELETE FROM acl_token_logins WHERE accessor_id = ?", (accessor,))
            tx.touch("acl", "tokens")
            return len(rows)
