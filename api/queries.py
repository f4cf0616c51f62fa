"""Prepared queries: Consul's ``/v1/query`` bodies, their templates, and what executing one selects.

Pure: no I/O (the views read the store and hand in what is needed). The client is at fault for
every ``BadRequest`` raised here.

Theory of operation
-------------------
A prepared query names a service and the conditions its instances must meet (tags, ``!tag``
exclusions, only passing, node and service meta, Connect), as Consul's
(agent/consul/prepared_query_endpoint.go). It is found by its ID, else by its exact ``Name``,
else, for a *template* (``Template.Type`` ``name_prefix_match``), by the longest ``Name``
that prefixes the name asked (an empty ``Name`` matches every name). A template is rendered
for the name asked before it runs: ``${name.full}``, ``${name.prefix}`` (the template's
``Name``), ``${name.suffix}`` (the rest) and, with ``Template.Regexp``, ``${match(N)}`` (the
regexp's N-th group on the name asked) are replaced in the strings of ``Service``, as
Consul's template engine does there; ``RemoveEmptyTags`` then drops tags that rendered empty.
Regexps are RE2 (google-re2, as Consul's Go regexps), so a stored pattern runs in linear time
on every name a DNS client sends.

Stored form: one JSON object per query, in Consul's read shape, but for the token: a query
keeps only the SHA-256 of its ``Token`` (``TokenHash``), as the ACL store keeps every secret
(SECURITY.md), and the reads show ``<hidden>`` for it. An index of 0 in a stored query means
"the index of the write that stored this version" (the index is known only inside that write);
``with_indexes`` fills it in on every read.

Trellis has one datacenter and no network coordinates, so ``Failover`` (``NearestN``,
``Datacenters``, ``Targets``) and ``Near`` are kept and shown but change nothing: execute
answers from this datacenter, with ``Failovers: 0``, in random order (Consul's order for
nodes it has no coordinates for).
"""

from __future__ import annotations

import copy
import json
import random
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from trellis.api.errors import BadRequest
from trellis.api.health import Instance, service_instances
from trellis.api.schemas import load
from trellis.api.schemas.query import (
    ConnectSchema,
    FailoverSchema,
    FailoverTargetSchema,
    PreparedQuerySchema,
    QueryDNSSchema,
    QueryServiceSchema,
    QueryTemplateSchema,
)
from trellis.api.store.base import Store
from trellis.proxy.durations import DurationError, parse_duration

NAME_PREFIX_MATCH = "name_prefix_match"
#: What the reads show for a query's token (Consul's redaction).
HIDDEN = "<hidden>"
#: At most this many prepared queries (they are stored as one document; see the views), and
#: at most this many bytes of JSON each: the document is read on every execute.
MAX_QUERIES = 1000
MAX_QUERY_BYTES = 16 * 1024
#: The system document that holds every prepared query.
DOC = "prepared-queries"
#: RE2's memory budget for a template's regexp (the same as ``?filter=``'s ``matches``).
REGEX_MAX_MEM = 1 << 20


def _names(schema: type) -> dict[str, str]:
    return {n.lower(): n for n in schema().load_fields}


_TOP = _names(PreparedQuerySchema)
_NESTED: dict[str, dict[str, str]] = {
    "Service": _names(QueryServiceSchema),
    "DNS": _names(QueryDNSSchema),
    "Template": _names(QueryTemplateSchema),
    "Failover": _names(FailoverSchema),
    "Connect": _names(ConnectSchema),
}
_TARGET = _names(FailoverTargetSchema)


def _fold(body: Any, names: Mapping[str, str]) -> Any:
    """``body`` with its field names (and those of the objects under it) in Consul's
    spelling; unknown names kept as sent, for the schema to refuse. Map values (meta) are
    left alone: their keys are data."""
    if not isinstance(body, Mapping):
        return body
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = names.get(str(key).lower(), key)
        if name in out:
            raise BadRequest(f"field {name!r} given twice (field names ignore case)")
        if name in _NESTED:
            value = _fold(value, _NESTED[name])
        elif name == "Targets" and isinstance(value, list):
            value = [_fold(t, _TARGET) for t in value]
        out[name] = value
    return out


def parse_query(body: Mapping[str, Any] | None, *, query_id: str) -> tuple[dict[str, Any], Any]:
    """The stored form of a create or update body (indexes 0, no token yet) and the token the
    body gives: a secret, ``None`` (no token) or ``HIDDEN`` (the caller sent back what it
    read: keep the stored one)."""
    fields = load(PreparedQuerySchema, _fold(body or {}, _TOP))
    svc = fields.get("Service") or {}
    if not svc.get("Service"):
        raise BadRequest("Must provide a Service name to query")
    for name in ("Peer", "SamenessGroup"):
        if svc.get(name):
            raise BadRequest(
                f"Service.{name}: Trellis has no cluster peering or sameness groups; leave it empty"
            )
    for name in ("Namespace", "Partition"):
        if svc.get(name) not in (None, "", "default"):
            raise BadRequest(f"Service.{name}: Trellis has only the default {name.lower()}")
    failover = svc.get("Failover") or {}
    dns = fields.get("DNS") or {}
    ttl = dns.get("TTL") or ""
    if ttl:
        try:
            seconds = parse_duration(ttl)
        except DurationError as e:
            raise BadRequest(f"DNS.TTL: {e}") from None
        if seconds < 0:
            raise BadRequest("DNS.TTL must not be negative")
    template = fields.get("Template") or {}
    ttype = template.get("Type") or ""
    if ttype not in ("", NAME_PREFIX_MATCH):
        raise BadRequest(f"Template.Type must be {NAME_PREFIX_MATCH!r}, not {ttype!r}")
    regexp = template.get("Regexp") or ""
    if regexp and not ttype:
        raise BadRequest("Template.Regexp is only for a template (Template.Type)")
    doc: dict[str, Any] = {
        "ID": query_id,
        "Name": fields.get("Name") or "",
        "Session": fields.get("Session") or "",
        "TokenHash": "",
        "Template": {
            "Type": ttype,
            "Regexp": regexp,
            "RemoveEmptyTags": bool(template.get("RemoveEmptyTags")),
        },
        "Service": {
            "Service": svc["Service"],
            "Failover": {
                "NearestN": failover.get("NearestN") or 0,
                "Datacenters": failover.get("Datacenters"),
                "Targets": failover.get("Targets"),
            },
            "IgnoreCheckIDs": svc.get("IgnoreCheckIDs"),
            "OnlyPassing": bool(svc.get("OnlyPassing")),
            "Near": svc.get("Near") or "",
            "Tags": svc.get("Tags"),
            "NodeMeta": svc.get("NodeMeta"),
            "ServiceMeta": svc.get("ServiceMeta"),
            "Connect": {"Enabled": bool((svc.get("Connect") or {}).get("Enabled"))},
        },
        "DNS": {"TTL": ttl},
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }
    if ttype:
        # Refuse a template that cannot render (an unknown variable, a bad regexp) now, not
        # at every lookup.
        _compile(regexp)
        _walk(doc["Service"], lambda s: _interpolate(s, {}, check_only=True))
    if len(json.dumps(doc)) > MAX_QUERY_BYTES:
        raise BadRequest(f"a prepared query may be at most {MAX_QUERY_BYTES} bytes of JSON")
    token = fields.get("Token")
    return doc, (token or None)


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower() and len(text) == 36
    except ValueError:
        return False


def acl_name(doc: Mapping[str, Any]) -> str:
    """The name ``query`` ACL rules decide on: the query's ``Name``, ``""`` for an unnamed
    one. (Consul exempts unnamed queries from every rule, their ID being the capability;
    Trellis governs them as the name ``""``, so that a client with no rights cannot fill the
    ``MAX_QUERIES`` every client shares.)"""
    return str(doc["Name"])


def with_indexes(doc: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A stored query with its pending (0) indexes set to ``index``, the document's."""
    out = dict(doc)
    for k in ("CreateIndex", "ModifyIndex"):
        out[k] = out.get(k) or index
    return out


def query_json(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A query as Consul's reads show it (the token redacted; see the module docstring)."""
    out: dict[str, Any] = {"ID": doc["ID"], "Name": doc["Name"], "Session": doc["Session"]}
    out["Token"] = HIDDEN if doc.get("TokenHash") else ""
    out["Template"] = copy.deepcopy(doc["Template"])
    out["Service"] = copy.deepcopy(doc["Service"])
    out["DNS"] = dict(doc["DNS"])
    out["CreateIndex"] = doc["CreateIndex"]
    out["ModifyIndex"] = doc["ModifyIndex"]
    return out


# -- finding and rendering ----------------------------------------------------------------------


def resolve(docs: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """The query ``key`` names, rendered for it if a template: by ID, by exact name, then the
    template with the longest name that prefixes ``key``."""
    for d in docs:
        if d["ID"] == key:
            return render(d, key) if d["Template"]["Type"] else dict(d)
    if not key:
        return None
    for d in docs:
        if d["Name"] == key:
            return render(d, key) if d["Template"]["Type"] else dict(d)
    best: Mapping[str, Any] | None = None
    for d in docs:
        if d["Template"]["Type"] and key.startswith(d["Name"]):
            if best is None or len(d["Name"]) > len(best["Name"]):
                best = d
    return render(best, key) if best is not None else None


def render(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A template rendered for ``name`` (see the module docstring)."""
    out = copy.deepcopy(dict(doc))
    prefix = str(doc["Name"])
    variables: dict[str, str] = {
        "name.full": name,
        "name.prefix": prefix,
        "name.suffix": name[len(prefix) :] if name.startswith(prefix) else name,
        "agent.segment": "",
    }
    regexp = doc["Template"].get("Regexp") or ""
    if regexp:
        m = _compile(regexp).search(name)
        groups: Sequence[str | None] = [m.group(0), *m.groups()] if m is not None else []
        for i, g in enumerate(groups):
            variables[f"match({i})"] = g or ""
    out["Service"] = _walk(out["Service"], lambda s: _interpolate(s, variables))
    if doc["Template"].get("RemoveEmptyTags") and out["Service"].get("Tags"):
        out["Service"]["Tags"] = [t for t in out["Service"]["Tags"] if t]
    return out


# Load balancing only; not a security decision, so the ordinary generator is right.
_shuffle = random.Random().shuffle  # noqa: S311

_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_MATCH = re.compile(r"match\(\s*(\d{1,3})\s*\)")
_KNOWN = ("name.full", "name.prefix", "name.suffix", "agent.segment")


def _interpolate(text: str, variables: Mapping[str, str], *, check_only: bool = False) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return "${"  # "$${" is a literal "${"
        expr = m.group(1).strip()
        match = _MATCH.fullmatch(expr)
        if match is not None:
            return variables.get(f"match({int(match.group(1))})", "")
        if expr not in _KNOWN:
            raise BadRequest(
                f"template: unknown variable ${{{expr}}} (known: name.full, name.prefix,"
                " name.suffix, agent.segment, match(N))"
            )
        return "" if check_only else variables.get(expr, "")

    return _VAR.sub(one, text)


def _walk(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_walk(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, fn) for k, v in value.items()}
    return value


def _compile(pattern: str) -> Any:
    """The RE2 regexp of a template (None for none); BadRequest if it does not compile."""
    if not pattern:
        return None
    import re2  # google-re2, as trellis.proxy.bexpr: linear time, whatever the name asked

    options = re2.Options()
    options.log_errors = False
    options.max_mem = REGEX_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        detail = e.args[0] if e.args else e
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise BadRequest(f"Template.Regexp: invalid regular expression: {detail}") from None


# -- execution ------------------------------------------------------------------------------------


def tag_filter(tags: Iterable[str] | None) -> Callable[[Iterable[str]], bool]:
    """Whether a service's tags meet a query's: each tag must be present and each ``!tag``
    absent, ignoring case (Consul's ``tagFilter``)."""
    want, refuse = set(), set()
    for t in tags or ():
        t = t.strip().lower()
        if t.startswith("!"):
            refuse.add(t[1:].strip())
        elif t:
            want.add(t)

    def ok(have: Iterable[str]) -> bool:
        low = {h.lower() for h in have}
        return want <= low and not (refuse & low)

    return ok


def healthy(
    statuses: Iterable[tuple[str, str]], *, only_passing: bool, ignore: Iterable[str]
) -> bool:
    """Whether an instance with these ``(check_id, status)`` checks is served: no critical
    (nor maintenance) check, and with ``only_passing`` no warning either; checks named in
    ``ignore`` do not count (Consul's ``IgnoreCheckIDs``)."""
    skip = set(ignore)
    for check_id, status in statuses:
        if check_id in skip or status == "passing":
            continue
        if status == "warning" and not only_passing:
            continue
        return False
    return True


def meta_matches(have: Mapping[str, str], want: Mapping[str, str] | None) -> bool:
    return all(have.get(k) == v for k, v in (want or {}).items())


def ttl_seconds(doc: Mapping[str, Any]) -> int | None:
    """The DNS TTL of a query's answers in whole seconds, or None (the server's default)."""
    ttl = doc["DNS"].get("TTL") or ""
    if not ttl:
        return None
    try:
        return max(0, int(parse_duration(ttl)))
    except DurationError:
        return None


def select(store: Store, doc: Mapping[str, Any], *, connect: bool = False) -> list[Instance]:
    """The instances a (rendered) query selects, in random order: Consul's shuffle, since
    Trellis has no coordinates to sort by (``Near`` changes nothing)."""
    svc = doc["Service"]
    tags_ok = tag_filter(svc.get("Tags"))
    ignore = svc.get("IgnoreCheckIDs") or ()
    out = [
        inst
        for inst in service_instances(
            store, svc["Service"], connect=connect or bool(svc["Connect"]["Enabled"])
        )
        if tags_ok(inst.service.tags)
        and meta_matches(inst.node.meta, svc.get("NodeMeta"))
        and meta_matches(inst.service.meta, svc.get("ServiceMeta"))
        and healthy(
            ((c.check_id, c.status) for c in inst.checks),
            only_passing=bool(svc.get("OnlyPassing")),
            ignore=ignore,
        )
    ]
    _shuffle(out)
    return out


def stored(store: Store) -> tuple[list[dict[str, Any]], int]:
    """Every prepared query (indexes filled in) and the document's index (0: none yet).

    A query tied to a session (``Session``) lives as long as the session, as in Consul: one
    whose session is gone is left out here (and dropped by the next write of the document).
    Every execute and every ``.query.`` DNS name reads them: the parsed document is kept per
    store and read again only when the document's index moved (one indexed read per call).
    """
    index = store.topic_index(f"system/{DOC}")
    with _cache_lock:
        hit = _cache.get(store)
    if hit is None or hit[0] != index:
        got = store.system_get(DOC)
        if got is None:
            return [], 0
        value, index = got
        hit = (index, [with_indexes(d, index) for d in value.get("Queries", ())])
        with _cache_lock:
            _cache[store] = hit
    index, docs = hit
    # A new list (a write builds the next document from it) of shared queries: treat them
    # as read-only (render and query_json copy what they change).
    return [d for d in docs if not d["Session"] or store.session_get(d["Session"])], index


_cache: weakref.WeakKeyDictionary[Any, tuple[int, list[dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()
