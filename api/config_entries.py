"""Consul's config entries (``/v1/config``) for the kinds that map onto Trellis.

Theory of operation
-------------------
Three kinds are taken; any other is the client's 400 naming these:

* ``service-intentions``: not stored as an entry at all. The entry of destination ``D`` *is*
  the intentions whose destination is ``D`` (its ``Sources``, one per source name), read from
  and written to the intentions store, so a write through either API is seen by the other.
  A PUT makes the intentions to ``D`` exactly the entry's sources (creating, replacing and
  deleting intentions one by one: not one transaction, so a reader may see a partial state
  for the moment between them; each intention write is atomic, and ``?cas=`` is checked
  against the destination's index just before the writes).
* ``service-defaults`` and ``proxy-defaults`` (``Name`` must be ``global``): kept as given, one
  system document per entry (``config/<kind>/<name>``), whose create and modify indexes are
  the entry's (so a snapshot restore renumbers them with everything else); ``?cas=`` is the
  store's compare-and-set on that document, in the write's own transaction.
  Trellis's proxies read none of their fields yet (README, "Config entries"): they are stored
  for the clients and tools that read them back.

What each field may hold is checked here (pure functions; BadRequest, the client's fault);
the views do the ACLs and the blocking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trellis.api.errors import BadRequest
from trellis.proxy import authz, names

INTENTIONS, PROXY_DEFAULTS, SERVICE_DEFAULTS = (
    "service-intentions",
    "proxy-defaults",
    "service-defaults",
)
KINDS = (INTENTIONS, PROXY_DEFAULTS, SERVICE_DEFAULTS)
#: Fields a client sends back from a read, accepted and ignored (Consul's Enterprise fields
#: too, at their default).
IGNORED = frozenset({"CreateIndex", "ModifyIndex", "Hash", "Partition", "Namespace"})
#: Consul's fields of each stored kind. Values not checked below are kept as given (objects
#: that Trellis does not interpret).
FIELDS = {
    SERVICE_DEFAULTS: frozenset(
        {
            "Kind",
            "Name",
            "Protocol",
            "Mode",
            "TransparentProxy",
            "MutualTLSMode",
            "MeshGateway",
            "Expose",
            "ExternalSNI",
            "UpstreamConfig",
            "Destination",
            "RateLimits",
            "MaxInboundConnections",
            "LocalConnectTimeoutMs",
            "LocalRequestTimeoutMs",
            "BalanceInboundConnections",
            "EnvoyExtensions",
            "Meta",
        }
    ),
    PROXY_DEFAULTS: frozenset(
        {
            "Kind",
            "Name",
            "Config",
            "Mode",
            "TransparentProxy",
            "MutualTLSMode",
            "MeshGateway",
            "Expose",
            "AccessLogs",
            "EnvoyExtensions",
            "FailoverPolicy",
            "PrioritizeByLocality",
            "Meta",
        }
    ),
    INTENTIONS: frozenset({"Kind", "Name", "Sources", "Meta"}),
}
SOURCE_FIELDS = frozenset(
    {
        "Name",
        "Action",
        "Description",
        "Type",
        "Precedence",
        "LegacyID",
        "LegacyMeta",
        "LegacyCreateTime",
        "LegacyUpdateTime",
        "Namespace",
        "Partition",
    }
)
#: Every top-level field name of every kind, by its folded spelling (``kind`` is ``Kind``).
_CANONICAL = {f.lower(): f for fs in FIELDS.values() for f in fs} | {f.lower(): f for f in IGNORED}
PROTOCOLS = ("tcp", "http", "http2", "grpc")
MODES = ("", "direct", "transparent")


def kind_arg(kind: str) -> str:
    if kind not in KINDS:
        raise BadRequest(
            f"config entry kind {kind!r} is not supported: Trellis takes {', '.join(KINDS)}"
            " (it has no gateways, routers, splitters or resolvers)"
        )
    return kind


def entry_name(kind: str, name: Any) -> str:
    """The entry's name, checked for its kind."""
    if not isinstance(name, str) or not name:
        raise BadRequest("Name is required (a string)")
    if kind == PROXY_DEFAULTS:
        if name != "global":
            raise BadRequest(f"proxy-defaults: Name must be 'global', not {name!r}")
        return name
    if kind == INTENTIONS:
        try:
            return authz.check_name(name)
        except authz.IntentionError as e:
            raise BadRequest(f"Name: {e}") from None
    if not names.is_service_name(name):
        raise BadRequest(f"Name {name!r} is not valid: {names.RULE}")
    return name


def _string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{what} must be an object of strings")
    return dict(value)


def fold_keys(body: Any) -> Any:
    """A body's top-level keys in Consul's spelling when they differ only in case (Consul
    decodes them case-insensitively; its config files use snake_case-free lowercase)."""
    if not isinstance(body, Mapping):
        return body
    return {(_CANONICAL.get(k.lower(), k) if isinstance(k, str) else k): v for k, v in body.items()}


def check_entry(body: Any) -> tuple[str, str, dict[str, Any]]:
    """A PUT body: its kind, its name and the entry to keep (ignored fields dropped).
    BadRequest naming what is wrong."""
    if not isinstance(body, Mapping):
        raise BadRequest("request body must be a JSON object")
    kind = body.get("Kind")
    if not isinstance(kind, str):
        raise BadRequest(f"Kind is required: one of {', '.join(KINDS)}")
    kind = kind_arg(kind)
    name = entry_name(kind, body.get("Name"))
    unknown = sorted(k for k in body if k not in FIELDS[kind] and k not in IGNORED)
    if unknown:
        raise BadRequest(f"{kind}: unknown field(s) {', '.join(unknown)}")
    entry = {k: v for k, v in body.items() if k not in IGNORED}
    entry["Kind"], entry["Name"] = kind, name
    if "Meta" in entry:
        entry["Meta"] = _string_map(entry["Meta"], "Meta")
    if "Protocol" in entry and entry["Protocol"] not in PROTOCOLS:
        raise BadRequest(f"Protocol must be one of {', '.join(PROTOCOLS)}")
    if "Mode" in entry and entry["Mode"] not in MODES:
        raise BadRequest("Mode must be '', 'direct' or 'transparent'")
    if "Config" in entry and not isinstance(entry["Config"], Mapping):
        raise BadRequest("Config must be an object")
    if kind == INTENTIONS:
        if entry.get("Meta"):
            raise BadRequest(
                "service-intentions: the entry's Meta is not kept (the entry is the"
                " intentions to its destination); put metadata on a source (LegacyMeta)"
            )
        entry["Sources"] = check_sources(entry.get("Sources"))
    return kind, name, entry


def check_sources(sources: Any) -> list[dict[str, Any]]:
    """A service-intentions entry's Sources: each a source name with an action (no L7
    ``Permissions``: Trellis's intentions are L4), at most one per name."""
    if sources is None:
        return []
    if not isinstance(sources, list):
        raise BadRequest("Sources must be a list")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, src in enumerate(sources):
        where = f"Sources[{i}]"
        if not isinstance(src, Mapping):
            raise BadRequest(f"{where} must be an object")
        if "Permissions" in src:
            raise BadRequest(
                f"{where}.Permissions: L7 permissions are not supported (Trellis's intentions"
                " allow or deny whole connections): give an Action"
            )
        unknown = sorted(k for k in src if k not in SOURCE_FIELDS)
        if unknown:
            raise BadRequest(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            name = authz.check_name(src.get("Name"))  # type: ignore[arg-type]  # checks the type
        except authz.IntentionError as e:
            raise BadRequest(f"{where}.Name: {e}") from None
        if name in seen:
            raise BadRequest(f"{where}.Name: {name!r} is given twice")
        seen.add(name)
        action = src.get("Action")
        if action not in ("allow", "deny"):
            raise BadRequest(f"{where}.Action must be allow or deny")
        if src.get("Type", "consul") != "consul":
            raise BadRequest(f"{where}.Type must be consul")
        description = src.get("Description", "")
        if not isinstance(description, str):
            raise BadRequest(f"{where}.Description must be a string")
        out.append(
            {
                "Name": name,
                "Action": action,
                "Description": description,
                "LegacyMeta": _string_map(src.get("LegacyMeta"), f"{where}.LegacyMeta"),
            }
        )
    return out
