"""``/v1/agent/*``: the endpoints of "this node's agent".

The server answers them for its own node (``node_name`` in its settings): registrations made
here land in the catalog on that node, and ``/v1/agent/services`` lists that node's services.
"""

from __future__ import annotations

import dataclasses
import socket
import time

from flask import Blueprint, request

from trellis.api import __version__
from trellis.api import catalog as cat
from trellis.api import maintenance as maint
from trellis.api.acl import service as acl
from trellis.api.app import CONSUL_SERVICE
from trellis.api.errors import BadRequest, MethodNotAllowed, NotFound
from trellis.api.feed import Watch
from trellis.api.http import (
    accepts_filter,
    filter_arg,
    flag,
    hash_blocking,
    json_body,
    json_response,
    services,
    str_arg,
)
from trellis.api.schemas import load
from trellis.api.schemas.catalog import CheckSchema, CheckUpdateSchema, ServiceSchema
from trellis.api.store.base import (
    CRITICAL,
    PASSING,
    WARNING,
    Check,
    Node,
    NodeView,
    Registration,
    Service,
)
from trellis.api.views.catalog import guard_overwrites, require_overwrite_write
from trellis.api.views.status import _addr
from trellis.proxy import filtershapes as shapes

bp = Blueprint("agent", __name__)


def local_node() -> Node:
    s = services().settings
    existing = services().store.node(s.node_name)
    if existing is not None:
        return existing
    return Node(name=s.node_name, id="", address=s.node_address, datacenter=s.datacenter)


def node_watch() -> Watch:
    return Watch("catalog", exact=(f"node/{services().settings.node_name}",))


#: The fields that make a check a script check (API and config-file spellings).
SCRIPT_FIELDS = ("Args", "ScriptArgs", "Script")


def refuse_script_checks(checks: list) -> None:
    """A server runs no checks of its own, so never a script: as a Consul agent without
    ``enable_script_checks``, it refuses one (the caller's 400, which says where scripts
    can run) rather than with an unknown-field error or by registering a check nothing runs."""
    for c in checks:
        if isinstance(c, dict) and any(c.get(k) for k in SCRIPT_FIELDS):
            raise BadRequest(
                "Scripts are disabled on this agent (a Trellis server runs no script checks);"
                " register script checks through a `trellis agent` started with"
                " enable_script_checks"
            )


def register_service_body(body: dict, *, replace_checks: bool) -> Service:
    """Register one service (and its sidecar) on this node from an agent registration body."""
    store = services().store
    settings = services().settings
    node = settings.node_name
    pascal = cat.to_pascal(cat.unwrap_service_body(body))
    if isinstance(pascal, dict):
        listed = pascal.get("Checks")
        refuse_script_checks([pascal.get("Check"), *(listed if isinstance(listed, list) else [])])
    d = load(ServiceSchema, pascal)
    svc = cat.build_service(node, d)
    defs = list(d.get("Checks") or [])
    if d.get("Check"):
        defs.insert(0, d["Check"])
    own_checks = cat.build_checks(node, svc, defs)
    sidecar_spec = (d.get("Connect") or {}).get("SidecarService")
    sidecar: tuple[Service, list[Check]] | None = None
    if sidecar_spec is not None:
        # As in Consul: a sidecar has no sidecar of its own. It used to be accepted and the
        # nested one silently dropped.
        if (sidecar_spec.get("Connect") or {}).get("SidecarService") is not None:
            raise BadRequest("SidecarService cannot have a nested SidecarService")
        # Built here with no port taken, so that a bad sidecar body is a 400 and its name is
        # vetted before the write; the port is chosen in the write (prepare, below).
        sidecar = _build_sidecar(node, svc, sidecar_spec, set())
    authz = acl.current()
    # The sidecar is derived from its parent's registration: write on the parent covers it.
    acl.require_registration(svc.name, svc.destination)
    if sidecar is not None and sidecar[0].name != f"{svc.name}-sidecar-proxy":
        # Fix: only the default sidecar name is the parent's; SidecarService.Name could name
        # any service (``db``), and registered an instance of it with write on ``web`` alone.
        acl.require_service_write(sidecar[0].name)

    def prepare(view: NodeView, reg: Registration) -> Registration:
        svcs, checks = [svc], list(own_checks)
        if sidecar is not None:
            sc, sc_checks = sidecar
            if not sidecar_spec.get("Port"):
                # Fix: the free port was read in one transaction and the sidecar written in
                # another, so registrations running together got the same port. Here no
                # other write can come in between. The parent's own port counts as taken.
                taken = view.ports_in_use(
                    cat.SIDECAR_MIN_PORT, cat.SIDECAR_MAX_PORT, except_ids=(svc.id, sc.id)
                )
                sc, sc_checks = _build_sidecar(node, svc, sidecar_spec, taken | {svc.port})
            svcs.append(sc)
            checks += sc_checks
        # Fix: nor may a registration replace another service's instance or check by its ID.
        require_overwrite_write(view, authz, svcs, checks)
        return dataclasses.replace(
            reg,
            services=tuple(svcs),
            checks=tuple(checks),
            replace_checks_for=tuple(s.id for s in svcs) if replace_checks else (),
        )

    store.register(Registration(node=local_node(), keep_existing_node=True), prepare=prepare)
    return svc


def _build_sidecar(
    node: str, parent: Service, spec: dict, taken_ports: set[int]
) -> tuple[Service, list[Check]]:
    """The sidecar service of ``connect.sidecar_service`` and its checks."""
    sc_d = load(ServiceSchema, cat.sidecar_for(parent, dict(spec), taken_ports))
    sidecar = cat.build_service(node, sc_d)
    return sidecar, cat.build_checks(node, sidecar, list(sc_d.get("Checks") or []))


@bp.put("/v1/agent/service/register")
def service_register():
    body = json_body()
    register_service_body(body, replace_checks=flag("replace-existing-checks"))
    return json_response(None)


@bp.put("/v1/agent/service/deregister/<path:service_id>")
def service_deregister(service_id: str):
    store = services().store
    node = services().settings.node_name
    local = {s.id: s for s in store.services(node=node)}
    owner = local.get(service_id)
    if owner is not None:
        acl.require_service_write(owner.name)
    sidecar = local.get(f"{service_id}-sidecar-proxy")
    # Fix: the instance with the sidecar's ID went with its parent whatever it was; it is the
    # parent's only when it proxies for it, else deregistering it needs write on it.
    if owner is not None and sidecar is not None and sidecar.destination != owner.name:
        acl.require_service_write(sidecar.name)
    if not store.deregister_service(node, service_id):
        raise NotFound(f"Unknown service ID {service_id!r}")
    # A sidecar registered through connect.sidecar_service goes with its parent.
    store.deregister_service(node, f"{service_id}-sidecar-proxy")
    return json_response(None)


def _local_services() -> dict:
    s = services()
    authz = acl.current()
    # The server's own ``consul`` entry is the catalog's, not an agent registration: Consul's
    # agent/services does not list it either.
    own = CONSUL_SERVICE if s.settings.register_node else None
    return {
        svc.id: cat.agent_service_json(svc, s.settings.datacenter)
        for svc in s.store.services(node=s.settings.node_name)
        if authz.service_read(svc.name) and svc.id != own
    }


@bp.get("/v1/agent/services")
@accepts_filter
def list_services():
    flt = filter_arg(shapes.AGENT_SERVICE)
    # The hash is the unfiltered list's, as an index is: a blocked client with a filter
    # returns on any change to the node's services (Consul's blocking semantics too).
    data, h = hash_blocking(node_watch(), _local_services)
    if flt is not None:
        data = {k: v for k, v in data.items() if flt(v)}
    data = {k: shapes.omit_empty(v) for k, v in data.items()}
    return json_response(data, headers={"X-Consul-ContentHash": h})


@bp.get("/v1/agent/service/<path:service_id>")
def get_service(service_id: str):
    if service_id.startswith("deregister/"):
        # IDs may hold slashes, so this route also matches a GET of a deregistration path.
        # Consul's longest-prefix routing sends that to deregister, which allows only PUT.
        raise MethodNotAllowed(
            f"method {request.method} is not allowed on {request.path}", headers={"Allow": "PUT"}
        )

    def compute():
        return _local_services().get(service_id)

    data, h = hash_blocking(node_watch(), compute)
    if data is None:
        raise NotFound(f"unknown service ID: {service_id}")
    data = shapes.omit_empty(data)
    data["ContentHash"] = h
    return json_response(data, headers={"X-Consul-ContentHash": h})


def _local_checks() -> dict:
    s = services()
    authz = acl.current()
    return {
        c.check_id: cat.check_json(c)
        for c in s.store.checks(node=s.settings.node_name)
        if (authz.service_read(c.service_name) if c.service_name else authz.node_read(c.node))
    }


@bp.get("/v1/agent/checks")
@accepts_filter
def list_checks():
    flt = filter_arg(shapes.HEALTH_CHECK)
    data = _local_checks()
    if flt is not None:
        data = {k: v for k, v in data.items() if flt(v)}
    return json_response(data)


@bp.put("/v1/agent/check/register")
def check_register():
    s = services()
    pascal = cat.to_pascal(json_body())
    refuse_script_checks([pascal])
    d = load(CheckSchema, pascal)
    owner = None
    if d.get("ServiceID"):
        owner = next(
            (x for x in s.store.services(node=s.settings.node_name) if x.id == d["ServiceID"]),
            None,
        )
        if owner is None:
            raise NotFound(f"ServiceID {d['ServiceID']!r} does not exist")
    if not d.get("Name"):
        raise BadRequest("Name: Missing data for required field.")
    d.setdefault("CheckID", d.get("ID") or d["Name"])
    if owner is not None:
        acl.require_service_write(owner.name)
    else:
        acl.require_node_write(s.settings.node_name)
    checks = cat.build_checks(s.settings.node_name, owner, [d])
    # Fix: a check that reuses another service's (or the node's) check ID replaces it;
    # checked inside the write (guard_overwrites), as what it replaces is there.
    s.store.register(
        Registration(node=local_node(), checks=tuple(checks), keep_existing_node=True),
        prepare=guard_overwrites(acl.current()),
    )
    return json_response(None)


@bp.put("/v1/agent/check/deregister/<path:check_id>")
def check_deregister(check_id: str):
    s = services()
    _require_check_write(check_id)
    if not s.store.deregister_check(s.settings.node_name, check_id):
        raise NotFound(f"Unknown check ID {check_id!r}")
    return json_response(None)


MAX_OUTPUT = 4096


def _require_check_write(check_id: str) -> None:
    """Updating a service's check needs service:write on it; a node check, node:write."""
    s = services()
    check = next(iter(s.store.checks(node=s.settings.node_name, check_id=check_id)), None)
    if check is None:
        return  # the caller answers 404
    if check.service_name:
        acl.require_service_write(check.service_name)
    else:
        acl.require_node_write(check.node)


def _update(check_id: str, status: str, output: str | None):
    s = services()
    if output is not None and len(output) > MAX_OUTPUT:
        # Consul truncates long output rather than refusing it.
        output = output[:MAX_OUTPUT] + " ... (Output exceeded 4096 bytes)"
    _require_check_write(check_id)
    c = s.store.update_check(s.settings.node_name, check_id, status, output, now=time.time())
    if c is None:
        raise NotFound(f"Unknown check ID {check_id!r}")
    return json_response(None)


@bp.put("/v1/agent/check/pass/<path:check_id>")
def check_pass(check_id: str):
    return _update(check_id, PASSING, str_arg("note", max_len=MAX_OUTPUT * 2))


@bp.put("/v1/agent/check/warn/<path:check_id>")
def check_warn(check_id: str):
    return _update(check_id, WARNING, str_arg("note", max_len=MAX_OUTPUT * 2))


@bp.put("/v1/agent/check/fail/<path:check_id>")
def check_fail(check_id: str):
    return _update(check_id, CRITICAL, str_arg("note", max_len=MAX_OUTPUT * 2))


@bp.put("/v1/agent/check/update/<path:check_id>")
def check_update(check_id: str):
    body = load(CheckUpdateSchema, cat.to_pascal(json_body(required=False) or {}))
    return _update(check_id, body["Status"], body["Output"])


def _maintenance_check(body: dict, service: Service | None) -> Check:
    node = services().settings.node_name
    return Check(
        node=node,
        check_id=body["CheckID"],
        name=body["Name"],
        status=CRITICAL,
        notes=body["Notes"],
        service_id=service.id if service else "",
        service_name=service.name if service else "",
        type=body["Type"],
    )


def _set_maintenance(check: Check, enable: bool) -> None:
    """Add the maintenance check (kept as it is if there is one: as Consul, the first reason
    stays), or remove it (nothing to remove is no error)."""
    s = services()
    node = s.settings.node_name
    if not enable:
        s.store.deregister_check(node, check.check_id)
        return

    def prepare(view: NodeView, reg: Registration) -> Registration:
        if view.check(check.check_id) is not None:
            return dataclasses.replace(reg, checks=())
        return reg

    s.store.register(
        Registration(node=local_node(), checks=(check,), keep_existing_node=True),
        prepare=prepare,
    )


@bp.put("/v1/agent/maintenance")
def node_maintenance():
    enable = maint.parse_enable(request.args.get("enable"))
    reason = maint.check_reason(str_arg("reason", max_len=maint.MAX_REASON))
    node = services().settings.node_name
    acl.require_node_write(node)
    _set_maintenance(_maintenance_check(maint.node_check(reason), None), enable)
    return json_response(None)


@bp.put("/v1/agent/service/maintenance/<path:service_id>")
def service_maintenance(service_id: str):
    enable = maint.parse_enable(request.args.get("enable"))
    reason = maint.check_reason(str_arg("reason", max_len=maint.MAX_REASON))
    s = services()
    authz = acl.current()  # first: an unknown token is refused whether the service exists
    svc = next((x for x in s.store.services(node=s.settings.node_name) if x.id == service_id), None)
    if svc is None:
        raise NotFound(f"Unknown service ID {service_id!r}")
    acl.require(authz.service_write(svc.name), f"service:write on {svc.name!r}")
    _set_maintenance(_maintenance_check(maint.service_check(svc.id, reason), svc), enable)
    return json_response(None)


@bp.get("/v1/agent/self")
def self_():
    s = services()
    # Consul asks agent:read; Trellis's agent is its node, so node:read on it.
    acl.require(acl.current().node_read(s.settings.node_name), "node:read (agent)")
    node = local_node()
    cfg = {
        "Datacenter": s.settings.datacenter,
        "NodeName": s.settings.node_name,
        "NodeID": node.id,
        "Server": True,
        "Revision": "",
        "Version": __version__,
        "Domain": s.settings.domain_fqdn,
        "PrimaryDatacenter": s.settings.datacenter,
        # Nanoseconds (Go's Duration), as Consul reports it; clients (Patroni) read it to
        # keep their session TTLs acceptable.
        "SessionTTLMin": round(s.settings.session_ttl_min * 1_000_000_000),
    }
    member = _own_member()
    debug = {
        # The subset of Consul's runtime configuration that clients read (Nomad's and
        # Consul's own tools among them), each with what Trellis really runs.
        "Datacenter": s.settings.datacenter,
        "PrimaryDatacenter": s.settings.datacenter,
        "NodeName": s.settings.node_name,
        "NodeID": node.id,
        "ServerMode": True,
        "Revision": "",
        "Version": __version__,
        "DNSDomain": s.settings.domain_fqdn,
        "DNSPort": s.settings.dns_port,
        "HTTPPort": s.settings.http_port,
        "HTTPSPort": -1,
        # No gRPC/xDS server: Consul's -1 is "disabled".
        "GRPCPort": -1,
        "GRPCTLSPort": -1,
        "ClientAddrs": [s.settings.http_host],
        "BindAddr": s.settings.http_host,
        "AdvertiseAddrLAN": s.settings.node_address,
        "ACLsEnabled": s.settings.acl_enabled,
        "ConnectEnabled": True,
        "EnableDebug": False,
        "EnableScriptChecks": False,  # a server runs no checks; node agents do
    }
    stats = {
        # Consul's consul section, which clients read for the leader's address: every
        # Trellis server is its own leader (/v1/status/leader says the same).
        "consul": {
            "server": "true",
            "leader": "true",
            "leader_addr": _addr(),
            "known_datacenters": "1",
        },
        "agent": {"checks": str(len(_local_checks())), "services": str(len(_local_services()))},
        "store": {"backend": s.store_kind, "index": str(s.store.current_index())},
        "blocking": {"waiting": str(s.store.feed.waiting())},
        # The live server processes sharing the store, which split the CSR limits.
        "cluster": {"server_processes": str(s.members.share()[1])},
        # Whether this process is the one that expires sessions (api/store/sessions.py).
        "sessions": {"reaper": str(s.reaper).lower()},
        "runtime": {"hostname": socket.gethostname()},
    }
    return json_response(
        {
            "Config": cfg,
            "DebugConfig": debug,
            "Member": member,
            "Meta": dict(node.meta),
            "Stats": stats,
        }
    )


def _own_member() -> dict:
    """This server's member entry, the same in agent/self and agent/members."""
    s = services().settings
    return {
        "Name": s.node_name,
        "Addr": s.node_address,
        "Port": s.http_port,
        "Tags": {"role": "consul", "dc": s.datacenter, "build": __version__},
        "Status": 1,
    }


@bp.get("/v1/agent/members")
@accepts_filter
def members():
    flt = filter_arg(shapes.AGENT_MEMBER)
    s = services()
    out = []
    authz = acl.current()
    for n in s.store.nodes():
        if not authz.node_read(n.name):
            continue
        if n.name == s.settings.node_name:
            # The same entry as agent/self's Member: clients match the two.
            out.append(_own_member())
            continue
        out.append(
            {
                "Name": n.name,
                "Addr": n.address,
                "Port": 8301,
                "Tags": {"dc": n.datacenter, "role": "node"},
                "Status": 1,
            }
        )
    if flt is not None:
        out = flt.select(out)
    return json_response(out)
