"""ACL policy rules in Consul's syntax (HCL or JSON), and the authorizer they compile into.

Pure: no I/O. The ACL endpoints parse a policy's rules with ``parse_rules`` when it is written
(so a bad policy is refused with a message that says where); enforcement builds one
``Authorizer`` per token from the ``Rules`` of all its policies and asks it questions.

Rules (Consul 1.4+ policy language, the subset Trellis enforces)::

    service "web"       { policy = "write"  intentions = "write" }
    service_prefix ""   { policy = "read" }
    node_prefix ""      { policy = "read" }
    key_prefix "app/"   { policy = "list" }
    key "app/secret"    { policy = "deny" }
    session_prefix ""   { policy = "write" }
    event_prefix "deploy" { policy = "write" }
    query_prefix "db-"  { policy = "write" }
    operator = "read"
    acl = "write"

or the same as JSON: ``{"service": {"web": {"policy": "write", "intentions": "write"}}, ...}``.
Anything else (other Consul resources such as ``agent`` or ``keyring``, unknown fields,
``list`` outside key rules, ``intentions`` outside service rules, two rules for the same name,
two values for one field) is refused: a rule Trellis would silently ignore is a hole.

Evaluation, as Consul's policy authorizer does it (acl/policy_authorizer.go):

* The rule that decides for a name is the most specific one: an exact rule (``service``,
  ``node``, ``key``) for that very name, else the *longest* matching prefix rule
  (``*_prefix``; plain string prefixes, case-sensitive, ``""`` matches everything). With no
  rule the default decides: allow when the ACL default policy is allow, deny when it is deny.
* Access levels: ``write`` grants write, read and list; ``read`` grants read (and, for keys,
  listing: Trellis, like Consul without ``enable_key_list_policy``, lets a reader list);
  ``list`` (keys only) grants list and read, as Consul's ``enforce`` does; ``deny`` grants
  nothing. ``operator`` and ``acl`` are read/write/deny with the same meaning.
* Intentions (destination-oriented): every service rule carries an intentions level, its
  explicit ``intentions`` or else one implied by its policy (read or write -> ``read``,
  deny -> ``deny``). ``intention_read(dest)`` / ``intention_write(dest)`` use the intentions
  level of the service rule that decides for ``dest``; so writing intentions needs an explicit
  ``intentions = "write"``.
* ``acl`` is never granted by the default: without an ``acl`` rule only a management token
  (or ACLs being off) may read or write ACLs, even when the default policy is allow (Consul's
  static authorizers: allow-all grants everything but ACL management).
* Several policies on one token are merged first, per resource and per exact name / per
  prefix: ``deny`` beats everything, then ``write``, then ``list``, then ``read`` (Consul's
  ``takesPrecedenceOver``). A service rule's explicit ``intentions`` merge the same way, on
  their own; with none explicit in any policy, the merged policy implies them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

READ, WRITE, LIST, DENY = "read", "write", "list", "deny"

#: A policy's rules text may be at most this many bytes (UTF-8).
MAX_RULES_BYTES = 64 * 1024

#: The rule blocks Trellis knows: HCL/JSON key -> (resource, prefix?).
BLOCKS: Mapping[str, tuple[str, bool]] = {
    "service": ("service", False),
    "service_prefix": ("service", True),
    "node": ("node", False),
    "node_prefix": ("node", True),
    "key": ("key", False),
    "key_prefix": ("key", True),
    "session": ("session", False),
    "session_prefix": ("session", True),
    "event": ("event", False),
    "event_prefix": ("event", True),
    "query": ("query", False),
    "query_prefix": ("query", True),
}
#: Top-level attributes: ``operator = "read"``, ``acl = "write"``.
SCALARS = ("operator", "acl")

_POLICIES: Mapping[str, tuple[str, ...]] = {
    "service": (READ, WRITE, DENY),
    "node": (READ, WRITE, DENY),
    "key": (READ, WRITE, LIST, DENY),
    "session": (READ, WRITE, DENY),
    "event": (READ, WRITE, DENY),
    "query": (READ, WRITE, DENY),
}
_LEVELS = (READ, WRITE, DENY)  # operator, acl and intentions

# Merge precedence between policies of one token (Consul's takesPrecedenceOver).
_RANK: Mapping[str, int] = {READ: 1, LIST: 2, WRITE: 3, DENY: 4}
# What each level grants.
_GRANTS: Mapping[str, frozenset[str]] = {
    DENY: frozenset(),
    READ: frozenset({READ, LIST}),
    LIST: frozenset({READ, LIST}),
    WRITE: frozenset({READ, LIST, WRITE}),
}


class RulesError(ValueError):
    """The client's rules text is bad; the message says where."""


@dataclass(frozen=True)
class Rule:
    resource: str  # "service" | "node" | "key"
    name: str  # the exact name, or the prefix ("" matches everything)
    prefix: bool  # a *_prefix rule
    policy: str  # read | write | deny | (keys only) list
    intentions: str | None = None  # service rules only: read | write | deny | None (implied)

    def __post_init__(self) -> None:
        # A backstop for rules built in code; parse_rules reports each fault with its place.
        allowed = _POLICIES.get(self.resource)
        if allowed is None or not isinstance(self.name, str) or self.policy not in allowed:
            raise RulesError(f"invalid rule {self!r}")
        if self.intentions is not None and (
            self.resource != "service" or self.intentions not in _LEVELS
        ):
            raise RulesError(f"invalid rule {self!r}")

    @property
    def block(self) -> str:
        """The rule's HCL/JSON key: ``service``, ``key_prefix``, ..."""
        return self.resource + ("_prefix" if self.prefix else "")


@dataclass(frozen=True)
class Rules:
    """One policy's rules, in a canonical order (so HCL and JSON forms compare equal)."""

    rules: tuple[Rule, ...] = ()
    operator: str | None = None  # read | write | deny | None
    acl: str | None = None  # read | write | deny | None

    def __post_init__(self) -> None:
        for level in (self.operator, self.acl):
            if level is not None and level not in _LEVELS:
                raise RulesError(f"invalid level {level!r}")


def parse_rules(text: str) -> Rules:
    """Parse a policy's rules (Consul HCL, or JSON when the text starts with ``{``).

    Raises ``RulesError`` with a message for the client. Results are cached by text: the
    same rules are parsed once however many requests their tokens make.
    """
    if not isinstance(text, str):
        raise RulesError("rules must be text")
    if len(text) > MAX_RULES_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_RULES_BYTES:
        raise RulesError(f"rules may be at most {MAX_RULES_BYTES} bytes")
    return _parse_cached(text)


@functools.lru_cache(maxsize=256)
def _parse_cached(text: str) -> Rules:
    stripped = text.strip()
    if not stripped:
        return Rules()
    doc = _load_json(text) if stripped.startswith("{") else _load_hcl(text)
    return _build(doc)


# -- loading ------------------------------------------------------------------------------


class _Object(dict[str, Any]):
    """A JSON object that remembers the keys it repeated (json keeps only the last value)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dups = []
        for key, _ in pairs:
            if key in seen:
                dups.append(key)
            seen.add(key)
        obj.duplicates = tuple(dups)
    return obj


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as e:
        raise RulesError(
            f"rules are not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
        ) from None
    except (ValueError, RecursionError):
        raise RulesError("rules are not valid JSON") from None


def _load_hcl(text: str) -> Any:
    import hcl2

    from trellis.api import hcl

    try:
        tree = hcl2.parses_to_tree(text)
    except Exception as e:  # lark's syntax errors, and RecursionError on deep nesting
        line, column = getattr(e, "line", None), getattr(e, "column", None)
        where = f" (line {line}, column {column})" if isinstance(line, int) and line > 0 else ""
        raise RulesError(f"rules are not valid HCL{where}") from None
    dup = _duplicate_attribute(tree)
    if dup is not None:
        name, line = dup
        raise RulesError(f"duplicate {_q(name)}" + (f" on line {line}" if line else ""))
    try:
        return hcl.loads(text)
    except Exception:
        raise RulesError("rules are not valid HCL") from None


def _duplicate_attribute(tree: Any) -> tuple[str, int | None] | None:
    """The first attribute (or object key) given twice in one body (or object), with its line.

    python-hcl2 keeps the last value of a repeated attribute; HCL forbids repeating one, and
    ``operator = "deny"`` silently overridden further down is not what its author meant.
    """
    from lark import Token, Tree

    def text_of(node: Any) -> str:
        if isinstance(node, Token):
            return "" if node == '"' else str(node)
        if isinstance(node, Tree):
            return "".join(text_of(c) for c in node.children)
        return ""

    def line_of(node: Any) -> int | None:
        if isinstance(node, Token):
            return node.line
        if isinstance(node, Tree):
            for c in node.children:
                line = line_of(c)
                if line is not None:
                    return line
        return None

    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, Tree):
            continue
        keys: list[Any] = []
        if node.data == "body":
            keys = [
                c.children[0]
                for c in node.children
                if isinstance(c, Tree) and c.data == "attribute" and c.children
            ]
        elif node.data == "object":
            keys = [
                c.children[0]
                for c in node.children
                if isinstance(c, Tree) and c.data == "object_elem" and c.children
            ]
        seen: set[str] = set()
        for key in keys:
            name = text_of(key)
            if name in seen:
                return name, line_of(key)
            seen.add(name)
        stack.extend(node.children)
    return None


# -- validation ---------------------------------------------------------------------------


def _q(name: str) -> str:
    """A name as it appears in a message: JSON-quoted (control characters escaped), capped."""
    return json.dumps(name if len(name) <= 64 else name[:64] + "...")


def _dups(obj: Any) -> tuple[str, ...]:
    return obj.duplicates if isinstance(obj, _Object) else ()


def _build(doc: Any) -> Rules:
    if not isinstance(doc, dict):
        raise RulesError("rules must be an object of rule blocks")
    if _dups(doc):
        raise RulesError(f"duplicate {_q(_dups(doc)[0])}")
    rules: list[Rule] = []
    seen: set[tuple[str, bool, str]] = set()
    levels: dict[str, str | None] = {}
    for key, value in doc.items():
        if key in SCALARS:
            levels[key] = _level(value, key)
        elif key in BLOCKS:
            resource, prefix = BLOCKS[key]
            for name, body in _named_blocks(key, value):
                if (resource, prefix, name) in seen:
                    raise RulesError(f"{key} {_q(name)}: duplicate rule")
                seen.add((resource, prefix, name))
                rules.append(_rule(key, resource, prefix, name, body))
        else:
            known = ", ".join(sorted([*BLOCKS, *SCALARS]))
            raise RulesError(f"unknown rule {_q(str(key))} (Trellis knows {known})")
    rules.sort(key=lambda r: (r.resource, r.prefix, r.name))
    return Rules(tuple(rules), operator=levels.get("operator"), acl=levels.get("acl"))


def _level(value: Any, where: str) -> str | None:
    """``operator`` / ``acl`` / ``intentions``: read, write or deny; "" means unset (Consul)."""
    if value == "":
        return None
    level = value.lower() if isinstance(value, str) else None
    if level not in _LEVELS:
        raise RulesError(f"{where} must be read, write or deny")
    return level


def _named_blocks(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``{name: body, ...}`` (JSON, HCL object) or ``[{name: body}, ...]`` (HCL blocks)."""
    shape = f'{key}: expected {key} "<name>" {{ policy = "..." }}'
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, dict):
            raise RulesError(shape)
        if _dups(item):
            raise RulesError(f"{key} {_q(_dups(item)[0])}: duplicate rule")
        for name, body in item.items():
            if not isinstance(body, dict):
                raise RulesError(shape)
            yield name, body


def _rule(key: str, resource: str, prefix: bool, name: str, body: Mapping[str, Any]) -> Rule:
    where = f"{key} {_q(name)}"
    if _dups(body):
        raise RulesError(f"{where}: duplicate {_q(_dups(body)[0])}")
    fields = ("policy", "intentions") if resource == "service" else ("policy",)
    for field in body:
        if field == "intentions" and resource != "service":
            raise RulesError(f"{where}: intentions are only for service and service_prefix rules")
        if field not in fields:
            known = " and ".join(fields)
            raise RulesError(f"{where}: unknown field {_q(str(field))} (a rule holds {known})")
    if "policy" not in body:
        raise RulesError(f"{where}: policy is required")
    raw = body["policy"]
    policy = raw.lower() if isinstance(raw, str) else None
    allowed = _POLICIES[resource]
    if policy == LIST and resource != "key":
        raise RulesError(f'{where}: policy "list" is only for key and key_prefix rules')
    if policy not in allowed:
        words = ", ".join(allowed[:-1]) + " or " + allowed[-1]
        raise RulesError(f"{where}: policy must be {words}")
    intentions = None
    if "intentions" in body:
        intentions = _level(body["intentions"], f"{where}: intentions")
    return Rule(resource, name, prefix, policy, intentions)


# -- the authorizer -----------------------------------------------------------------------


def _stronger(a: str | None, b: str | None) -> str | None:
    """The one of two levels that wins a merge; None (unset) loses to anything."""
    if a is None:
        return b
    if b is None:
        return a
    return a if _RANK[a] >= _RANK[b] else b


@dataclass(frozen=True)
class _Merged:
    policy: str
    intentions: str | None  # explicit, merged


class _Table:
    """The merged rules of one resource: exact rules by name, prefix rules by prefix."""

    def __init__(self) -> None:
        self.exact: dict[str, _Merged] = {}
        self.prefix: dict[str, _Merged] = {}
        self.lengths: tuple[int, ...] = ()  # distinct prefix lengths, longest first

    def add(self, rule: Rule) -> None:
        table = self.prefix if rule.prefix else self.exact
        old = table.get(rule.name)
        if old is None:
            table[rule.name] = _Merged(rule.policy, rule.intentions)
        else:
            policy = _stronger(old.policy, rule.policy)
            assert policy is not None
            table[rule.name] = _Merged(policy, _stronger(old.intentions, rule.intentions))

    def seal(self) -> None:
        self.lengths = tuple(sorted({len(p) for p in self.prefix}, reverse=True))

    def lookup(self, name: str) -> _Merged | None:
        """The exact rule for ``name``, else the longest prefix rule that matches it."""
        hit = self.exact.get(name)
        if hit is not None:
            return hit
        # One dict probe per distinct prefix length, not per character of a long name.
        for n in self.lengths:
            if n <= len(name):
                hit = self.prefix.get(name[:n])
                if hit is not None:
                    return hit
        return None


class Authorizer:
    """Answers permission questions for one token: the union of its policies' rules over a
    default (the ACL default policy)."""

    def __init__(self, rules: Iterable[Rules], *, default_allow: bool) -> None:
        self._default_allow = bool(default_allow)
        self._everything = False
        self._tables = {resource: _Table() for resource in _POLICIES}
        self._operator: str | None = None
        self._acl: str | None = None
        for one in rules:
            for rule in one.rules:
                self._tables[rule.resource].add(rule)
            self._operator = _stronger(self._operator, one.operator)
            self._acl = _stronger(self._acl, one.acl)
        for table in self._tables.values():
            table.seal()

    @classmethod
    def allow_all(cls) -> Authorizer:
        """ACLs disabled: every question is answered yes."""
        authz = cls((), default_allow=True)
        authz._everything = True
        return authz

    @classmethod
    def management(cls) -> Authorizer:
        """A global-management token: everything allowed, whatever the default."""
        authz = cls((), default_allow=True)
        authz._everything = True
        return authz

    def __repr__(self) -> str:
        if self._everything:
            return "<Authorizer: everything>"
        n = sum(len(t.exact) + len(t.prefix) for t in self._tables.values())
        default = "allow" if self._default_allow else "deny"
        return f"<Authorizer: {n} rules, default {default}>"

    # -- the questions ----------------------------------------------------------------

    def _check(self, resource: str, name: str, need: str) -> bool:
        if self._everything:
            return True
        rule = self._tables[resource].lookup(name)
        if rule is None:
            return self._default_allow
        return need in _GRANTS[rule.policy]

    def _intention(self, destination: str, need: str) -> bool:
        if self._everything:
            return True
        rule = self._tables["service"].lookup(destination)
        if rule is None:
            return self._default_allow
        level = rule.intentions
        if level is None:
            level = READ if rule.policy in (READ, WRITE) else DENY
        return need in _GRANTS[level]

    def _scalar(self, level: str | None, need: str, default: bool) -> bool:
        if self._everything:
            return True
        if level is None:
            return default
        return need in _GRANTS[level]

    def service_read(self, name: str) -> bool:
        return self._check("service", name, READ)

    def service_write(self, name: str) -> bool:
        return self._check("service", name, WRITE)

    def intention_read(self, destination: str) -> bool:
        """Explicit ``intentions`` on the deciding service rule, else its policy's read/write."""
        return self._intention(destination, READ)

    def intention_write(self, destination: str) -> bool:
        """Only an explicit ``intentions = "write"`` (or no rule under a default allow)."""
        return self._intention(destination, WRITE)

    def node_read(self, name: str) -> bool:
        return self._check("node", name, READ)

    def node_write(self, name: str) -> bool:
        return self._check("node", name, WRITE)

    def key_read(self, key: str) -> bool:
        return self._check("key", key, READ)

    def key_list(self, prefix: str) -> bool:
        """List keys under ``prefix``: a list, read or write rule grants it."""
        return self._check("key", prefix, LIST)

    def key_write(self, key: str) -> bool:
        return self._check("key", key, WRITE)

    def key_write_prefix(self, prefix: str) -> bool:
        """Write every key under ``prefix`` (a recursive delete), as Consul's KeyWritePrefix:
        the longest prefix rule at or above ``prefix`` must grant write (with none, the
        default decides), and no rule, exact or prefix, at or under ``prefix`` may grant less
        than write."""
        if self._everything:
            return True
        table = self._tables["key"]
        for rules in (table.exact, table.prefix):
            for name, rule in rules.items():
                if name.startswith(prefix) and rule.policy != WRITE:
                    return False
        for n in table.lengths:
            if n <= len(prefix):
                base = table.prefix.get(prefix[:n])
                if base is not None:
                    return base.policy == WRITE
        return self._default_allow

    def session_read(self, node: str) -> bool:
        """Read the sessions of ``node`` (Consul's session rules name nodes)."""
        return self._check("session", node, READ)

    def session_write(self, node: str) -> bool:
        """Create, renew or destroy a session on ``node``."""
        return self._check("session", node, WRITE)

    def event_read(self, name: str) -> bool:
        """List events named ``name`` (``event`` rules name events, as Consul's)."""
        return self._check("event", name, READ)

    def event_write(self, name: str) -> bool:
        """Fire an event named ``name``."""
        return self._check("event", name, WRITE)

    def query_read(self, name: str) -> bool:
        """Read the prepared query named ``name`` (``query`` rules name queries)."""
        return self._check("query", name, READ)

    def query_write(self, name: str) -> bool:
        """Create, change or delete the prepared query named ``name``."""
        return self._check("query", name, WRITE)

    def operator_read(self) -> bool:
        return self._scalar(self._operator, READ, self._default_allow)

    def operator_write(self) -> bool:
        return self._scalar(self._operator, WRITE, self._default_allow)

    def acl_read(self) -> bool:
        """Never granted by the default: an ``acl`` rule or management only."""
        return self._scalar(self._acl, READ, False)

    def acl_write(self) -> bool:
        """Never granted by the default: an ``acl`` rule or management only."""
        return self._scalar(self._acl, WRITE, False)
