"""Service and node identities and templated policies: rules a token or role gets by name.

Consul lets a token (or a role) say "this is service ``api``" instead of naming a policy; the
server then grants the rules of a *synthetic* policy made from a fixed template. The templates
are Consul's (its ``builtin/service``, ``builtin/node`` and ``builtin/dns`` templated
policies, which service and node identities are shorthand for), so a token means here what it
means to Consul:

* a service identity (or ``builtin/service`` with ``Name``): write on the service and on its
  sidecar ``<name>-sidecar-proxy``, read on every service and node (to discover upstreams);
* a node identity (or ``builtin/node`` with ``Name``): write on the node, read on every service;
* ``builtin/dns``: read on every node, service and prepared query (what DNS answers from).

Pure: text in, policy text out; no store, no Flask. ``Datacenters`` on an identity are kept and
shown but not enforced, as for policies (Trellis serves one datacenter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Consul's service and node name rule for identities: lower-case letters, digits, '-', '_',
#: starting and ending with a letter or digit (at most 256 characters).
_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,254}[a-z0-9])?$")

_SERVICE = (
    'service "{name}" {{\n  policy = "write"\n}}\n'
    'service "{name}-sidecar-proxy" {{\n  policy = "write"\n}}\n'
    'service_prefix "" {{\n  policy = "read"\n}}\n'
    'node_prefix "" {{\n  policy = "read"\n}}\n'
)
_NODE = 'node "{name}" {{\n  policy = "write"\n}}\nservice_prefix "" {{\n  policy = "read"\n}}\n'
_DNS = (
    'node_prefix "" {\n  policy = "read"\n}\n'
    'service_prefix "" {\n  policy = "read"\n}\n'
    'query_prefix "" {\n  policy = "read"\n}\n'
)

NAME_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "$ref": "#/definitions/min-length-one"}},
        "required": ["name"],
        "definitions": {"min-length-one": {"type": "string", "minLength": 1}},
    },
    indent=1,
)


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    #: Consul's Go template text (shown by ``GET /v1/acl/templated-policy/name/...``).
    shown: str
    #: The Python format string rendered with ``name``.
    text: str
    needs_name: bool


TEMPLATES: Mapping[str, Template] = {
    t.name: t
    for t in (
        Template(
            "builtin/service",
            "Gives the token or role permissions to register a service and discover services"
            " in the Consul catalog. It also gives the specified service's sidecar proxy the"
            " permission to discover and route traffic to other services.",
            _SERVICE.format(name="{{.Name}}"),
            _SERVICE,
            True,
        ),
        Template(
            "builtin/node",
            "Gives the token or role permissions for a register an agent/node into the"
            " catalog. A node is typically a consul agent but can also be a physical server,"
            " cloud instance or a container.",
            _NODE.format(name="{{.Name}}"),
            _NODE,
            True,
        ),
        Template(
            "builtin/dns",
            "Gives the token or role permissions for the Consul DNS to query services in the"
            " network.",
            _DNS,
            _DNS,
            False,
        ),
    )
}


class IdentityError(ValueError):
    """A bad identity or templated policy: the client's fault (a 400 at the boundary)."""


def check_name(name: Any, what: str) -> str:
    """``name`` if it is a valid identity name; IdentityError (the client's fault) if not."""
    if not isinstance(name, str) or not _IDENTITY_NAME.match(name):
        raise IdentityError(
            f"{what} must be 1-256 lower-case letters, digits, '-' or '_', starting and ending"
            " with a letter or digit"
        )
    return name


def service_rules(name: str) -> str:
    return _SERVICE.format(name=name)


def node_rules(name: str) -> str:
    return _NODE.format(name=name)


def templated_rules(template: str, variables: Mapping[str, Any]) -> str:
    """The rules of a templated policy; IdentityError for an unknown template or a missing or
    bad ``Name`` (the client's fault)."""
    t = TEMPLATES.get(template)
    if t is None:
        raise IdentityError(f"no such templated policy: {template!r}")
    if not t.needs_name:
        return t.text
    name = variables.get("Name", variables.get("name"))
    if name is None:
        raise IdentityError(f"templated policy {template!r} needs the variable Name")
    return t.text.format(name=check_name(name, f"{template} Name"))
