"""``trellis_service``: one service instance in the catalog, with its checks and its sidecar.

Theory of operation. A Terraform-managed service is a catalog registration
(``/v1/catalog/register``) on a named node, made of up to two services:

* the service itself (``service_id``, default ``name``) with its ``check`` blocks;
* with ``sidecar = true``, its connect-proxy, ``<service_id>-sidecar-proxy``. Its body is not
  built here: it comes from :func:`trellis.proxy.config.sidecar_registration`, the code the
  server's agent endpoints and the node agent use for ``connect.sidecar_service`` (ID, name,
  the first free port of 21000-21255 unless ``sidecar_port`` is given, the parent's tags, meta
  and address, ``Proxy.DestinationServiceName``/``LocalServicePort``), with the ``upstream``
  blocks as ``Proxy.Upstreams``. One difference, on purpose: its default TCP and alias checks
  are left out. Those need an agent on the node to run them; a catalog registration has none
  (the server runs no check), so they would stay critical forever and the sidecar would never
  receive a connection. With no check the sidecar is healthy, as any service without checks.

The node is written with ``SkipNodeUpdate``: an existing node (an agent's, with its address and
meta) is left as it is; a missing one is created with ``address`` (127.0.0.1 when unset) and is
not removed on destroy (other registrations may live on it).

The catalog has no "not set" for a port, tags or meta, so the state keeps the configuration's
spelling when the server holds the empty value (:func:`trellis.terraform.fields.same_or`).
Tags are a set (their order means nothing to the catalog, so reordering them plans nothing).
A check's ``status`` is the status it is registered with: whoever runs the check changes it
afterwards, so a different status on the server is not drift.

Sidecar ports: without ``sidecar_port``, the port is chosen from the node's registrations at
apply time. Creates run in parallel within one ``terraform apply`` (one provider process), so
the choice and the write are serialized by a lock here; two separate runs (or an agent) writing
the same node at the same moment could still pick the same port, which ``sidecar_port`` avoids.

Import ID: ``NODE/SERVICE_ID``.
"""

from __future__ import annotations

import threading
from typing import Any

from tf import schema, types
from tf.blocks import SetNestedBlock
from tf.iface import (
    Config,
    CreateContext,
    DeleteContext,
    ImportContext,
    PlanContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.types import Unknown
from tf.utils import Diagnostics

from trellis.proxy.client import APIError, Client
from trellis.proxy.config import ConfigError, sidecar_registration
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check, same_or
from trellis.terraform.provider import TrellisProvider

#: The API's field names in a 400's message, and the attribute each comes from.
FIELDS = {
    "Port": "port",
    "Tags": "tags",
    "Meta": "meta",
    "Address": "address",
    "Checks": "check",
    "Upstreams": "upstream",
}
CHECK_STATES = ("passing", "warning", "critical")
#: Check attributes and their API fields (the definition's, for the last five).
_CHECK_FIELDS = {
    "check_id": "CheckID",
    "name": "Name",
    "notes": "Notes",
    "status": "Status",
    "tcp": "TCP",
    "http": "HTTP",
    "ttl": "TTL",
    "interval": "Interval",
    "timeout": "Timeout",
}
_UPSTREAM_FIELDS = {
    "destination_name": "DestinationName",
    "local_bind_port": "LocalBindPort",
    "local_bind_address": "LocalBindAddress",
}
#: Sidecar port choice and registration, one at a time in this provider process.
_SIDECAR_PORTS = threading.Lock()


def sidecar_id(service_id: str) -> str:
    return f"{service_id}-sidecar-proxy"


def _hint(name: Any, sidecar: bool = False) -> str:
    # Registering a sidecar takes write on it as well as on its service (the server's rule
    # against a token intercepting another service's traffic).
    rule = f'service "{name}" {{ policy = "write" }}'
    if sidecar:
        rule += f'\n    service "{name}-sidecar-proxy" {{ policy = "write" }}'
    return rule


def _label(state: State) -> str:
    return f"service {state.get('node')}/{state.get('service_id') or state.get('name')}"


class ServiceResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "service"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        s = types.String()
        check_block = schema.Block(
            attributes=[
                schema.Attribute("check_id", s, required=True, description="Unique on the node."),
                schema.Attribute("name", s, required=True),
                schema.Attribute("notes", s, optional=True),
                schema.Attribute(
                    "status",
                    s,
                    optional=True,
                    description="The status it is registered with (`passing`, `warning`, "
                    "`critical`; default `critical`). Whoever runs the check changes it.",
                ),
                schema.Attribute("tcp", s, optional=True, description="`HOST:PORT`."),
                schema.Attribute("http", s, optional=True, description="`http(s)://...`."),
                schema.Attribute("ttl", s, optional=True, description="A duration (`30s`)."),
                schema.Attribute("interval", s, optional=True, description="For tcp and http."),
                schema.Attribute("timeout", s, optional=True),
            ]
        )
        upstream_block = schema.Block(
            attributes=[
                schema.Attribute(
                    "destination_name", s, required=True, description="The service called."
                ),
                schema.Attribute(
                    "local_bind_port",
                    types.Number(),
                    required=True,
                    description="Where the sidecar listens for the app's connections to it.",
                ),
                schema.Attribute(
                    "local_bind_address", s, optional=True, description="Default 127.0.0.1."
                ),
            ]
        )
        return schema.Schema(
            version=1,
            description="A service instance in the catalog, with its checks and its Connect "
            "sidecar. Import ID: `NODE/SERVICE_ID`.",
            attributes=[
                schema.Attribute("id", s, computed=True, description="`NODE/SERVICE_ID`."),
                schema.Attribute(
                    "name", s, required=True, requires_replace=True, description="The service."
                ),
                schema.Attribute(
                    "service_id",
                    s,
                    optional=True,
                    computed=True,
                    requires_replace=True,
                    description="The instance's ID on its node; default `name`.",
                ),
                schema.Attribute(
                    "node",
                    s,
                    required=True,
                    requires_replace=True,
                    description="The node it runs on (created when missing, never updated).",
                ),
                schema.Attribute(
                    "address", s, optional=True, description="Default: the node's address."
                ),
                schema.Attribute("port", types.Number(), optional=True),
                schema.Attribute(
                    "tags", types.Set(s), optional=True, description="Order does not matter."
                ),
                schema.Attribute("meta", types.Map(s), optional=True),
                schema.Attribute(
                    "sidecar",
                    types.Bool(),
                    optional=True,
                    description="Register its Connect sidecar (`<service_id>-sidecar-proxy`).",
                ),
                schema.Attribute(
                    "sidecar_port",
                    types.Number(),
                    optional=True,
                    computed=True,
                    description="The sidecar's public port; default the first free one of "
                    "21000-21255 on the node.",
                ),
            ],
            block_types=[
                SetNestedBlock("check", check_block),
                SetNestedBlock("upstream", upstream_block),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        for name in ("name", "service_id", "node"):
            check(diags, config, name, validation.catalog_name)
        check(diags, config, "port", validation.port)
        check(diags, config, "sidecar_port", validation.port)
        sidecar = config.get("sidecar")
        if sidecar is not True and sidecar is not Unknown:
            for name in ("sidecar_port", "upstream"):
                if validation.known(config.get(name)) and config.get(name) != []:
                    diags.add_error(
                        f"{name} needs sidecar = true",
                        f"{name} configures the service's Connect sidecar, which is only "
                        "registered with sidecar = true.",
                        path=[name],
                    )
        checks = config.get("check")
        for c in checks if isinstance(checks, list) else []:
            _validate_check(diags, c)
        ups = config.get("upstream")
        seen: set[Any] = set()
        for u in ups if isinstance(ups, list) else []:
            for problem in (
                validation.service_name(u.get("destination_name")),
                validation.port(u.get("local_bind_port")),
            ):
                if problem:
                    diags.add_error("Invalid upstream", problem, path=["upstream"])
            port = u.get("local_bind_port")
            if validation.known(port) and port in seen:
                diags.add_error(
                    "Two upstreams on one port",
                    f"local_bind_port {port} is given to more than one upstream.",
                    path=["upstream"],
                )
            seen.add(port)

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State | None:
        # sidecar_port is optional and computed: left out of the configuration, Terraform
        # proposes the prior value. Say what the apply will do instead, or the result would be
        # refused as inconsistent with the plan.
        if planned.get("sidecar") is not True:
            planned["sidecar_port"] = None
        elif planned.get("sidecar_port") is None:
            planned["sidecar_port"] = Unknown
        return planned

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        if planned.get("service_id") in (None, Unknown):
            planned = {**planned, "service_id": planned["name"]}
        return self._write(ctx.diagnostics, planned, None, "create")

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        return self._write(ctx.diagnostics, planned, current, "update") or current

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            return self._read(api, current["node"], current["service_id"], current)
        except APIError as e:
            api_error(ctx.diagnostics, e, f"read {_label(current)}", hint=_hint(current["name"]))
            return current

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        node, sid = current["node"], current["service_id"]
        try:
            services = _services(api, node)
            # Only what is there: gone already (deregistered outside Terraform) is not an
            # error, and deregistering an ID the node does not have needs node:write, which a
            # team's token scoped to its services lacks.
            if _own_sidecar(services, sid) is not None:
                api.catalog_deregister(node, service_id=sidecar_id(sid))
            if sid in services:
                api.catalog_deregister(node, service_id=sid)
        except APIError as e:
            api_error(
                ctx.diagnostics,
                e,
                f"delete {_label(current)}",
                hint=_hint(current["name"], current.get("sidecar") is True),
            )
            return current
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        node, sep, sid = id.partition("/")
        problem = None if sep else "use NODE/SERVICE_ID (node-1/web)"
        problem = problem or validation.catalog_name(node) or _service_id_problem(sid)
        if problem:
            ctx.diagnostics.add_error(f"Invalid import ID {id!r}", problem)
            return None
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        try:
            found = self._read(api, node, sid, None)
        except APIError as e:
            api_error(ctx.diagnostics, e, f"import service {id}")
            return None
        if found is None:
            ctx.diagnostics.add_error(
                f"Cannot import service {id}: there is none",
                f"Node {node!r} has no service with ID {sid!r} (IDs are case-sensitive; "
                f"`curl $TRELLIS_HTTP_ADDR/v1/catalog/node/{node}` lists them).",
            )
        return found

    # -- the registration -----------------------------------------------------------------------

    def _write(
        self, diags: Diagnostics, planned: State, current: State | None, doing: str
    ) -> State | None:
        api = self.provider.api(diags)
        if api is None:
            return None
        node, sid = planned["node"], planned["service_id"]
        label = f"{doing} {_label(planned)}"
        conflict = ""
        registered = {**planned, "id": f"{node}/{sid}", "sidecar_port": None}
        written = False
        try:
            if current is None and sid in _services(api, node):
                conflict = (
                    f"Node {node!r} has a service with ID {sid!r} already, registered outside "
                    "this configuration. Import it (terraform import "
                    f"trellis_service.NAME {node}/{sid}) or choose another service_id."
                )
                raise APIError(409, f"service ID {sid!r} exists on node {node!r}")
            api.catalog_register(
                {
                    "Node": node,
                    "Address": planned.get("address") or "127.0.0.1",
                    "SkipNodeUpdate": True,
                    "Service": _service_body(planned),
                    "Checks": [_check_body(c, sid) for c in planned.get("check") or []],
                }
            )
            written = True
            if sid not in _services(api, node):
                # Registered, but invisible to this token: every later read would take the
                # service for deleted and plan to create it again, forever.
                diags.add_error(
                    f"Cannot {label}: the provider's token cannot read it back",
                    f"The service was registered, but the token lacks node:read on {node!r} "
                    "(reading a node's services needs it, as in Consul). Add to its policy:"
                    f'\n\n    node "{node}" {{ policy = "read" }}\n',
                    path=["node"],
                )
                return registered
            # Checks removed from the configuration (or added outside it) go: the catalog
            # keeps every check it is not told to remove.
            wanted = {c["check_id"] for c in planned.get("check") or []}
            for c in api.health_node(node):
                if c.get("ServiceID") == sid and c.get("CheckID") not in wanted:
                    api.catalog_deregister(node, check_id=c["CheckID"])
            port = self._write_sidecar(api, planned)
        except (APIError, ConfigError) as e:
            if isinstance(e, ConfigError):  # no free sidecar port on the node
                diags.add_error(f"Cannot {label}", str(e), path=["sidecar_port"])
            else:
                api_error(
                    diags,
                    e,
                    label,
                    fields=FIELDS,
                    attribute="name",
                    hint=_hint(planned["name"], planned.get("sidecar") is True),
                    conflict=conflict,
                )
            # A create that failed after the service was registered (its sidecar refused)
            # returns it: Terraform keeps it in the state as tainted, so the next apply
            # replaces it and destroy removes it, instead of taking it for someone else's.
            return registered if written and current is None else None
        return {**registered, "sidecar_port": port}

    def _write_sidecar(self, api: Client, planned: State) -> int | None:
        node, sid = planned["node"], planned["service_id"]
        if planned.get("sidecar") is not True:
            if _own_sidecar(_services(api, node), sid) is not None:
                api.catalog_deregister(node, service_id=sidecar_id(sid))
            return None
        spec: dict[str, Any] = {
            "Proxy": {"Upstreams": [_upstream_body(u) for u in planned.get("upstream") or []]}
        }
        if planned.get("sidecar_port") not in (None, Unknown):
            spec["Port"] = int(planned["sidecar_port"])
        with _SIDECAR_PORTS:
            services = _services(api, node)
            mine = _own_sidecar(services, sid)
            if "Port" not in spec and mine is not None:
                spec["Port"] = mine["Port"]  # keep the port it has
            taken = {s["Port"] for k, s in services.items() if k != sidecar_id(sid)}
            body = sidecar_registration(
                spec,
                parent_id=sid,
                parent_name=planned["name"],
                parent_port=int(planned.get("port") or 0),
                parent_address=planned.get("address") or "",
                tags=sorted(planned.get("tags") or ()),
                meta=planned.get("meta") or {},
                taken_ports=taken,
            )
            body.pop("Checks", None)  # see the module's docstring: nobody would run them
            api.catalog_register(
                {
                    "Node": node,
                    "Address": planned.get("address") or "127.0.0.1",
                    "SkipNodeUpdate": True,
                    "Service": body,
                }
            )
        return int(body["Port"])

    @staticmethod
    def _read(api: Client, node: str, sid: str, current: State | None) -> State | None:
        services = _services(api, node)
        svc = services.get(sid)
        if svc is None:
            return None
        cur = current or {}
        sidecar = _own_sidecar(services, sid)
        checks = [c for c in api.health_node(node) if c.get("ServiceID") == sid]
        prior_checks = {c["check_id"]: c for c in cur.get("check") or []}
        upstreams = [
            _upstream_state(u) for u in ((sidecar or {}).get("Proxy") or {}).get("Upstreams") or []
        ]
        return {
            "id": f"{node}/{sid}",
            "name": svc.get("Service", ""),
            "service_id": sid,
            "node": node,
            "address": same_or(cur.get("address"), svc.get("Address") or "", ""),
            "port": same_or(cur.get("port"), svc.get("Port") or 0, 0),
            "tags": same_or(cur.get("tags"), sorted(set(svc.get("Tags") or [])), []),
            "meta": same_or(cur.get("meta"), dict(svc.get("Meta") or {}), {}),
            "sidecar": same_or(cur.get("sidecar"), sidecar is not None, False),
            "sidecar_port": None if sidecar is None else sidecar.get("Port"),
            # Blocks: never null in Terraform (no block is an empty set).
            "check": [_check_state(c, prior_checks.get(c["CheckID"])) for c in checks],
            "upstream": upstreams,
        }


def _services(api: Client, node: str) -> dict[str, Any]:
    """The node's services by ID (none when there is no such node)."""
    return dict((api.catalog_node(node).value or {}).get("Services") or {})


def _own_sidecar(services: dict[str, Any], sid: str) -> dict[str, Any] | None:
    """The sidecar of service ``sid``; not an instance that merely has its ID."""
    sidecar = services.get(sidecar_id(sid))
    if sidecar is None or sidecar.get("Kind") != "connect-proxy":
        return None
    if (sidecar.get("Proxy") or {}).get("DestinationServiceID") != sid:
        return None
    return dict(sidecar)


# -- API bodies and state, both ways ------------------------------------------------------------


def _service_body(planned: State) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ID": planned["service_id"],
        "Service": planned["name"],
        "Tags": sorted(planned.get("tags") or ()),
        "Meta": dict(planned.get("meta") or {}),
        "Port": int(planned.get("port") or 0),
    }
    if planned.get("address"):
        body["Address"] = planned["address"]
    return body


def _check_body(c: dict[str, Any], service_id: str) -> dict[str, Any]:
    body = {api: c[attr] for attr, api in _CHECK_FIELDS.items() if c.get(attr) not in (None, "")}
    body["ServiceID"] = service_id
    return body


def _check_state(found: dict[str, Any], prior: dict[str, Any] | None) -> dict[str, Any]:
    definition = found.get("Definition") or {}
    prior = prior or {}
    state: dict[str, Any] = {
        "check_id": found.get("CheckID", ""),
        "name": found.get("Name", ""),
        "notes": same_or(prior.get("notes"), found.get("Notes") or "", ""),
        # Registered with; the runner's later changes are not drift (module docstring).
        "status": prior.get("status") if prior else found.get("Status"),
    }
    for attr in ("tcp", "http", "ttl", "interval", "timeout"):
        value = definition.get(_CHECK_FIELDS[attr]) or ""
        state[attr] = same_or(prior.get(attr), value, "")
    return state


def _upstream_body(u: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "DestinationName": u["destination_name"],
        "LocalBindPort": int(u["local_bind_port"]),
    }
    if u.get("local_bind_address"):
        body["LocalBindAddress"] = u["local_bind_address"]
    return body


def _upstream_state(u: dict[str, Any]) -> dict[str, Any]:
    return {
        "destination_name": u.get("DestinationName", ""),
        "local_bind_port": u.get("LocalBindPort", 0),
        "local_bind_address": u.get("LocalBindAddress") or None,
    }


def _service_id_problem(sid: str) -> str | None:
    if not sid or len(sid) > 256 or "/" in sid or any(ord(ch) < 32 for ch in sid):
        return f"service ID {sid!r} is not valid"
    return None


def _validate_check(diags: Diagnostics, c: dict[str, Any]) -> None:
    def bad(problem: str) -> None:
        diags.add_error("Invalid check", f"check {c.get('check_id')!r}: {problem}", path=["check"])

    status = c.get("status")
    if validation.known(status) and status not in CHECK_STATES:
        bad(f"status must be one of {', '.join(CHECK_STATES)}, not {status!r}")
    for attr in ("ttl", "interval", "timeout"):
        problem = validation.duration(c.get(attr))
        if problem:
            bad(f"{attr}: {problem}")
    kinds = [k for k in ("tcp", "http", "ttl") if validation.known(c.get(k)) and c.get(k)]
    if len(kinds) > 1:
        bad(f"a check has one type; got {', '.join(kinds)}")
    if any(k in kinds for k in ("tcp", "http")) and not validation.known(c.get("interval")):
        if c.get("interval") is not Unknown:
            bad("tcp and http checks need an interval")
