"""The two spellings of a registration: the config-file form (``name``, ``check_id``) and the
API form (``Name``, ``CheckID``). Pure.

``to_pascal`` rewrites the first into the second, leaving the *values* of opaque maps (``Meta``,
``Config``, ``Header``...) untouched. The server's registration endpoints and the node agent
both read definitions through it, so one table decides what ``tls_skip_verify`` means.
"""

from __future__ import annotations

from typing import Any

#: Keys whose values are free-form maps: their keys are kept exactly as sent.
OPAQUE = frozenset({"Meta", "NodeMeta", "Config", "Header", "ServiceMeta", "EnvoyExtensions"})
#: Keys whose values are maps with free-form keys but structured values.
FREE_KEYS = frozenset({"TaggedAddresses"})
# Matched in any case: an API body's field names are (``META`` is ``Meta``), and the keys of
# the map under it are data all the same.
_OPAQUE = frozenset(k.lower() for k in OPAQUE)
_FREE_KEYS = frozenset(k.lower() for k in FREE_KEYS)

SPECIAL = {
    "id": "ID",
    "ttl": "TTL",
    "http": "HTTP",
    "tcp": "TCP",
    "udp": "UDP",
    "grpc": "GRPC",
    "grpc_use_tls": "GRPCUseTLS",
    "tls_skip_verify": "TLSSkipVerify",
    "tls_server_name": "TLSServerName",
    "check_id": "CheckID",
    "service_id": "ServiceID",
    "node_id": "NodeID",
    "destination_service_id": "DestinationServiceID",
    "args": "ScriptArgs",
    "script_args": "ScriptArgs",
    "docker_container_id": "DockerContainerID",
    "h2ping": "H2PING",
    "alias_node": "AliasNode",
    "alias_service": "AliasService",
}


class SpellingError(ValueError):
    """The document cannot be read in one spelling (the sender's fault): a key that is not a
    string, or a field given twice in two spellings."""


def pascal(key: str) -> str:
    if key in SPECIAL:
        return SPECIAL[key]
    if not key or key[0].isupper():
        return key
    return "".join(p[:1].upper() + p[1:] for p in key.split("_"))


def to_pascal(value: Any, parent: str = "") -> Any:
    """Rewrite config-file (snake_case) keys into API (PascalCase) keys, recursively."""
    if isinstance(value, list):
        return [to_pascal(v, parent) for v in value]
    if not isinstance(value, dict):
        return value
    if parent.lower() in _OPAQUE:
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise SpellingError("object keys must be strings")
        nk = k if parent.lower() in _FREE_KEYS else pascal(k)
        if nk in out:
            raise SpellingError(f"field {nk!r} is given twice (as {k!r} and another spelling)")
        out[nk] = to_pascal(v, nk)
    return out
