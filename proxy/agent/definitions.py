"""Service and check definitions, as the agent reads them from config files and its local API.
Pure: text and dicts in, values out; nothing here opens a socket.

A definition arrives in either spelling (``name``/``Name``, see ``spelling``) and leaves as a
``ServiceDef``: the PascalCase service body the catalog takes, its checks as PascalCase
bodies with their IDs settled, and what the agent must run for it (``CheckDef``s for the
check runner; ``managed_proxy`` for the one-line ``connect.proxy`` form, whose connect-proxy
registration ``trellis.proxy.agent.managed`` builds once the agent gave it a port). A definition the
agent cannot use raises ``DefinitionError`` naming the field; in a file, the error names the
file too, and only that file is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trellis.proxy import names
from trellis.proxy.agent.ports import CRITICAL, PASSING, WARNING, CheckDef
from trellis.proxy.agent.spelling import SpellingError, to_pascal
from trellis.proxy.config import ConfigError, sidecar_registration
from trellis.proxy.durations import DurationError, parse_duration
from trellis.proxy.requestrules import FieldNameError, ListOf, MapOf, Shape, fold_names

STATES = (PASSING, WARNING, CRITICAL)
#: Check fields the catalog stores (its CheckSchema); the agent keeps the rest to itself.
CATALOG_CHECK_FIELDS = (
    "CheckID",
    "Name",
    "Notes",
    "ServiceID",
    "HTTP",
    "Method",
    "Header",
    "TCP",
    "Interval",
    "Timeout",
    "TLSSkipVerify",
    "TLSServerName",
    "DeregisterCriticalServiceAfter",
    "AliasService",
    "AliasNode",
)
# The fields of a service and of a check, as the servers' ServiceSchema and CheckSchema
# declare them (a test compares the two), plus a script check's ScriptArgs, which only an
# agent runs. Names are matched in any case, as Consul's decoder and the servers match them
# (``trellis.proxy.requestrules``), at every level; any other name is a typo, refused with the
# file's path (or by the local API) rather than by the server at every sync.
CHECK = Shape(
    "Check",
    dict.fromkeys(
        (
            "CheckID",
            "ID",
            "Name",
            "Notes",
            "Status",
            "ServiceID",
            "Output",
            "TTL",
            "HTTP",
            "Method",
            "Header",
            "Body",
            "TCP",
            "Interval",
            "Timeout",
            "TLSSkipVerify",
            "TLSServerName",
            "DeregisterCriticalServiceAfter",
            "SuccessBeforePassing",
            "FailuresBeforeCritical",
            "AliasService",
            "AliasNode",
            "Type",
            "Definition",
            "Namespace",
            "ScriptArgs",
        )
    ),
)
UPSTREAM = Shape(
    "Upstream",
    dict.fromkeys(
        (
            "DestinationType",
            "DestinationName",
            "DestinationNamespace",
            "DestinationPartition",
            "DestinationPeer",
            "Datacenter",
            "LocalBindAddress",
            "LocalBindPort",
            "LocalBindSocketPath",
            "LocalBindSocketMode",
            "Config",
            "MeshGateway",
            "CentrallyConfigured",
        )
    ),
)
PROXY = Shape(
    "Proxy",
    {
        **dict.fromkeys(
            (
                "DestinationServiceName",
                "DestinationServiceID",
                "LocalServiceAddress",
                "LocalServicePort",
                "LocalServiceSocketPath",
                "Mode",
                "Config",
                "MeshGateway",
                "Expose",
                "TransparentProxy",
                "ExecMode",
                "Command",
            )
        ),
        "Upstreams": ListOf(UPSTREAM),
    },
)
SERVICE = Shape("Service")
CONNECT = Shape("Connect", {"Native": None, "Proxy": PROXY, "SidecarService": SERVICE})
SERVICE.define(
    {
        **dict.fromkeys(
            (
                "ID",
                "Name",
                "Service",
                "Tags",
                "Address",
                "Meta",
                "Port",
                "Kind",
                "EnableTagOverride",
                "Namespace",
                "Partition",
                "Locality",
                "SocketPath",
                "CreateIndex",
                "ModifyIndex",
            )
        ),
        "TaggedAddresses": MapOf(Shape("TaggedAddress", {"Address": None, "Port": None})),
        "Proxy": PROXY,
        "Connect": CONNECT,
        "Check": CHECK,
        "Checks": ListOf(CHECK),
        "Weights": Shape("Weights", {"Passing": None, "Warning": None}),
    }
)
#: What Consul's clients send back as they read it, accepted and dropped (as by the servers).
READ_ONLY_SERVICE_FIELDS = ("CreateIndex", "ModifyIndex")
CONFIG_SUFFIXES = (".json", ".hcl")
MAX_FILE_BYTES = 4 * 1024 * 1024


class DefinitionError(ValueError):
    """A definition the agent cannot use: the fault of whoever wrote it."""


@dataclass(frozen=True)
class ServiceDef:
    """One service of the agent's node, ready to be registered."""

    id: str
    name: str
    body: Mapping[str, Any]  # the catalog's ``Service``: PascalCase, no Check(s)
    checks: tuple[Mapping[str, Any], ...] = ()  # PascalCase, CheckID and ServiceID set
    token: str = ""
    source: str = "api"  # "api", or the file it came from
    #: The ``connect.sidecar_service`` block, expanded by ``sidecar_service``.
    sidecar: Mapping[str, Any] | None = None
    #: The one-line ``connect.proxy`` form: the agent runs a managed sidecar.
    managed_proxy: bool = False

    def to_json(self) -> dict[str, Any]:
        """What the data dir keeps of an API registration."""
        out = dict(self.body)
        if self.checks:
            out["Checks"] = [dict(c) for c in self.checks]
        if self.sidecar is not None:
            connect = dict(out.get("Connect") or {})
            connect["SidecarService"] = dict(self.sidecar)
            out["Connect"] = connect
        return out


@dataclass(frozen=True)
class NodeCheck:
    """A check of the node itself (no ServiceID) or of a service, registered on its own."""

    id: str
    body: Mapping[str, Any]
    token: str = ""
    source: str = "api"


@dataclass
class Definitions:
    services: list[ServiceDef] = field(default_factory=list)
    checks: list[NodeCheck] = field(default_factory=list)


# -- reading documents -----------------------------------------------------------------------


def parse_document(text: str, path: str) -> Any:
    """A JSON or HCL (by the ``.hcl`` suffix) document; raises DefinitionError."""
    try:
        if path.endswith(".hcl"):
            from trellis.api import hcl

            return hcl.loads(text)
        return json.loads(text)
    except Exception as e:  # hcl2 raises lark's exceptions, json ValueError
        raise DefinitionError(f"cannot decode: {e}") from None


def split_document(doc: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The service and check bodies of a config document: ``service``/``services`` and
    ``check``/``checks`` at top level, either spelling."""
    if not isinstance(doc, dict):
        raise DefinitionError("the document must hold an object")
    svcs: list[Any] = []
    checks: list[Any] = []
    for k, v in doc.items():
        if k in ("service", "Service"):
            svcs.extend(v if isinstance(v, list) else [v])
        elif k in ("services", "Services"):
            if not isinstance(v, list):
                raise DefinitionError("'services' must be a list")
            svcs.extend(v)
        elif k in ("check", "Check"):
            checks.extend(v if isinstance(v, list) else [v])
        elif k in ("checks", "Checks"):
            if not isinstance(v, list):
                raise DefinitionError("'checks' must be a list")
            checks.extend(v)
        elif k == "acl":
            pass  # acl.tokens.agent: the agent's own token, read by config_agent_token
        else:
            raise DefinitionError(f"unexpected key {k!r} (want service(s) or check(s))")
    for x in (*svcs, *checks):
        if not isinstance(x, dict):
            raise DefinitionError("a service or check definition must be an object")
    return svcs, checks


def load_file(path: str, *, token: str = "", enable_script_checks: bool = False) -> Definitions:
    """The definitions in one config file; raises DefinitionError (without the path)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise DefinitionError(f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise DefinitionError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DefinitionError("not UTF-8 text") from None
    svcs, checks = split_document(parse_document(text, path))
    out = Definitions()
    for s in svcs:
        out.services.append(
            service_def(s, token=token, source=path, enable_script_checks=enable_script_checks)
        )
    for c in checks:
        out.checks.append(
            node_check(c, token=token, source=path, enable_script_checks=enable_script_checks)
        )
    return out


def config_agent_token(dirs: Sequence[str], files: Sequence[str]) -> str:
    """Consul's ``acl.tokens.agent`` in the agent's config files (the last file that sets it
    wins): the token the agent sends for its own registrations when ``-token`` is not given.
    A file that cannot be read or parsed sets nothing here; ``load_config`` reports it."""
    token = ""
    for p in config_files(dirs, files)[0]:
        try:
            with open(p, "rb") as f:
                doc = parse_document(f.read(MAX_FILE_BYTES).decode("utf-8"), p)
        except (OSError, UnicodeDecodeError, DefinitionError):
            continue
        acl = doc.get("acl") if isinstance(doc, dict) else None
        tokens = acl.get("tokens") if isinstance(acl, dict) else None
        agent = tokens.get("agent") if isinstance(tokens, dict) else None
        if isinstance(agent, str) and agent.strip():
            token = agent.strip()
    return token


def config_files(dirs: Sequence[str], files: Sequence[str]) -> tuple[list[str], list[str]]:
    """The files to load, in order (each directory's ``*.json``/``*.hcl``, sorted, then the
    ``-config-file``s), and the problems with the directories themselves."""
    out: list[str] = []
    errors: list[str] = []
    for d in dirs:
        try:
            entries = sorted(os.listdir(d))
        except OSError as e:
            errors.append(f"{d}: cannot read the directory: {e.strerror}")
            continue
        for name in entries:
            p = os.path.join(d, name)
            if name.endswith(CONFIG_SUFFIXES) and not name.startswith(".") and os.path.isfile(p):
                out.append(p)
    out.extend(files)
    return out, errors


def load_config(
    dirs: Sequence[str],
    files: Sequence[str],
    *,
    token: str = "",
    enable_script_checks: bool = False,
) -> tuple[Definitions, list[str]]:
    """Every definition of the config dirs and files, and one message per refused file
    (``path: reason``). A refused file contributes nothing; the others are kept. A service or
    check ID that an earlier file defined refuses the later file."""
    paths, errors = config_files(dirs, files)
    out = Definitions()
    seen_services: dict[str, str] = {}
    seen_checks: dict[str, str] = {}
    for p in paths:
        try:
            d = load_file(p, token=token, enable_script_checks=enable_script_checks)
            for s in d.services:
                if s.id in seen_services:
                    raise DefinitionError(
                        f"service ID {s.id!r} is also defined in {seen_services[s.id]}"
                    )
            for c in d.checks:
                if c.id in seen_checks:
                    raise DefinitionError(
                        f"check ID {c.id!r} is also defined in {seen_checks[c.id]}"
                    )
        except DefinitionError as e:
            errors.append(f"{p}: {e}")
            continue
        for s in d.services:
            seen_services[s.id] = p
        for c in d.checks:
            seen_checks[c.id] = p
        out.services.extend(d.services)
        out.checks.extend(d.checks)
    return out, errors


# -- services ---------------------------------------------------------------------------------


def _pascal(raw: Mapping[str, Any], shape: Shape, what: str) -> dict[str, Any]:
    """``raw`` in the API spelling: config-file names (``check_id``) rewritten, then every
    name matched to ``shape`` in any case; an unknown name is a DefinitionError."""
    unknown: list[str] = []
    try:
        out = fold_names(shape, to_pascal(dict(raw)), unknown=unknown)
    except (SpellingError, FieldNameError) as e:
        raise DefinitionError(str(e)) from None
    if unknown:
        raise DefinitionError(f"unknown {what} field {unknown[0]!r}")
    assert isinstance(out, dict)
    return out


def _str(d: Mapping[str, Any], key: str, what: str = "") -> str:
    v = d.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DefinitionError(f"{what or key} must be a string")
    return v


def service_def(
    raw: Mapping[str, Any],
    *,
    token: str = "",
    source: str = "api",
    enable_script_checks: bool = False,
) -> ServiceDef:
    """A service definition (either spelling, optionally wrapped in ``{"service": ...}``)."""
    if len(raw) == 1:
        ((k, v),) = raw.items()
        if k in ("service", "Service") and isinstance(v, dict):
            raw = v
    d = _pascal(raw, SERVICE, "service")
    for k in READ_ONLY_SERVICE_FIELDS:
        d.pop(k, None)
    name = _str(d, "Name") or _str(d, "Service")
    if not name:
        raise DefinitionError("Name: a service needs a name")
    if not names.is_service_name(name):
        raise DefinitionError(f"service name {name!r} is not valid: {names.RULE}")
    d.pop("Service", None)
    d["Name"] = name
    sid = _str(d, "ID") or name
    if not names.is_instance_id(sid):
        raise DefinitionError(f"service ID {sid!r} is not valid: {names.ID_RULE}")
    d["ID"] = sid
    port = d.get("Port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise DefinitionError("Port must be a whole number from 0 to 65535")
    tags = d.get("Tags")
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
    ):
        raise DefinitionError("Tags must be a list of strings")
    meta = d.get("Meta")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise DefinitionError("Meta must map names to strings")
    _str(d, "Address")
    _str(d, "Kind")
    defs: list[Any] = list(d.pop("Checks", None) or [])
    one = d.pop("Check", None)
    if one:
        defs.append(one)
    if not all(isinstance(c, dict) for c in defs):
        raise DefinitionError("Checks must be a list of objects")
    multi = len(defs) > 1
    checks = []
    for i, c in enumerate(defs, 1):
        c = dict(c)
        default_id = f"service:{sid}" + (f":{i}" if multi else "")
        c["CheckID"] = _str(c, "CheckID") or _str(c, "ID") or default_id
        c.pop("ID", None)
        c["ServiceID"] = sid
        c.setdefault("Name", f"Service '{name}' check")
        checks.append(check_body(c, enable_script_checks=enable_script_checks))
    sidecar = None
    managed = False
    connect = d.get("Connect")
    if connect is not None:
        if not isinstance(connect, dict):
            raise DefinitionError("Connect must be an object")
        connect = dict(connect)
        if "SidecarService" in connect:
            sidecar = connect.pop("SidecarService")
            if sidecar is not None and not isinstance(sidecar, dict):
                raise DefinitionError("Connect.SidecarService must be an object")
        proxy = connect.get("Proxy")
        if proxy is not None:
            if not isinstance(proxy, dict):
                raise DefinitionError("Connect.Proxy must be an object")
            if connect.get("Native"):
                raise DefinitionError("a service cannot be Connect-native and have a managed proxy")
            managed = True
        d["Connect"] = connect
    kind = d.get("Kind", "")
    if kind == "connect-proxy":
        p = d.get("Proxy")
        if not isinstance(p, dict) or not p.get("DestinationServiceName"):
            raise DefinitionError("a connect-proxy needs Proxy.DestinationServiceName")
    return ServiceDef(
        id=sid,
        name=name,
        body=d,
        checks=tuple(checks),
        token=token,
        source=source,
        sidecar=sidecar,
        managed_proxy=managed,
    )


def sidecar_service(parent: ServiceDef, taken_ports: Iterable[int]) -> ServiceDef:
    """The connect-proxy service of ``connect.sidecar_service``, with the same defaults the
    server applies (``trellis.proxy.config.sidecar_registration``)."""
    assert parent.sidecar is not None
    pb = parent.body
    try:
        body = sidecar_registration(
            _pascal(parent.sidecar, SERVICE, "sidecar service"),
            parent_id=parent.id,
            parent_name=parent.name,
            parent_port=int(pb.get("Port") or 0),
            parent_address=str(pb.get("Address") or ""),
            tags=list(pb.get("Tags") or []),
            meta=dict(pb.get("Meta") or {}),
            taken_ports=set(taken_ports),
        )
    except ConfigError as e:
        raise DefinitionError(str(e)) from None
    return service_def(body, token=parent.token, source=parent.source)


# -- checks -----------------------------------------------------------------------------------


def _duration(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key)
    if v in (None, ""):
        return 0.0
    if isinstance(v, bool):
        raise DefinitionError(f"{key}: not a duration")
    if isinstance(v, int | float):
        # Consul's JSON decoder takes a bare number as nanoseconds.
        return float(v) / 1e9
    if not isinstance(v, str):
        raise DefinitionError(f"{key}: not a duration")
    try:
        return parse_duration(v)
    except DurationError as e:
        raise DefinitionError(f"{key}: {e}") from None


def check_kind(d: Mapping[str, Any]) -> str:
    kinds = [
        k
        for k, f in (
            ("ttl", "TTL"),
            ("http", "HTTP"),
            ("tcp", "TCP"),
            ("alias", "AliasService"),
            ("script", "ScriptArgs"),
        )
        if d.get(f)
    ]
    if not kinds and d.get("AliasNode"):
        kinds = ["alias"]
    if not kinds:
        raise DefinitionError("a check needs one of TTL, HTTP, TCP, AliasService or Args")
    if len(kinds) > 1:
        raise DefinitionError(f"a check has one type; got {', '.join(kinds)}")
    return kinds[0]


def check_body(raw: Mapping[str, Any], *, enable_script_checks: bool = False) -> dict[str, Any]:
    """A check definition in PascalCase with its fields checked (``check_def`` must accept
    it); raises DefinitionError."""
    d = _pascal(raw, CHECK, "check")
    if "ID" in d and "CheckID" not in d:
        d["CheckID"] = d.pop("ID")
    kind = check_kind(d)
    if kind == "script" and not enable_script_checks:
        raise DefinitionError(
            "script checks (args) are disabled on this agent (start it with -enable-script-checks)"
        )
    if kind == "script" and (
        not isinstance(d["ScriptArgs"], list)
        or not all(isinstance(a, str) for a in d["ScriptArgs"])
    ):
        raise DefinitionError("Args must be a list of strings")
    if kind in ("http", "tcp", "script") and not _duration(d, "Interval"):
        raise DefinitionError("HTTP, TCP and script checks need an Interval")
    if kind == "http" and not str(d["HTTP"]).startswith(("http://", "https://")):
        raise DefinitionError("HTTP must be an http:// or https:// URL")
    status = d.get("Status") or CRITICAL
    if status not in STATES:
        raise DefinitionError(f"Status must be one of {', '.join(STATES)}")
    header = d.get("Header")
    if header is not None and (
        not isinstance(header, dict)
        or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values()
        )
    ):
        raise DefinitionError("Header must map names to lists of strings")
    for k in ("Name", "Notes", "CheckID", "ServiceID", "Method", "TCP", "Output"):
        _str(d, k)
    if not d.get("CheckID"):
        if not d.get("Name"):
            raise DefinitionError("a check needs a CheckID or a Name")
        d["CheckID"] = d["Name"]
    if not names.is_instance_id(d["CheckID"]):
        raise DefinitionError(f"check ID {d['CheckID']!r} is not valid: {names.ID_RULE}")
    d.setdefault("Name", d["CheckID"])
    check_def(d)  # the durations
    return d


def check_def(d: Mapping[str, Any]) -> CheckDef:
    """The runner's view of a check body (PascalCase, as ``check_body`` leaves it)."""
    kind = check_kind(d)
    header = {str(k): tuple(v) for k, v in (d.get("Header") or {}).items()}
    return CheckDef(
        check_id=str(d["CheckID"]),
        name=str(d.get("Name") or d["CheckID"]),
        service_id=str(d.get("ServiceID") or ""),
        kind=kind,
        interval=_duration(d, "Interval") or 10.0,
        timeout=_duration(d, "Timeout") or 10.0,
        http=str(d.get("HTTP") or ""),
        method=str(d.get("Method") or "GET"),
        header=header,
        tls_skip_verify=bool(d.get("TLSSkipVerify", False)),
        tcp=str(d.get("TCP") or ""),
        ttl=_duration(d, "TTL"),
        alias_service=str(d.get("AliasService") or ""),
        alias_node=str(d.get("AliasNode") or ""),
        args=tuple(d.get("ScriptArgs") or ()),
        deregister_critical_after=_duration(d, "DeregisterCriticalServiceAfter"),
        status=str(d.get("Status") or CRITICAL),
        notes=str(d.get("Notes") or ""),
    )


def node_check(
    raw: Mapping[str, Any],
    *,
    token: str = "",
    source: str = "api",
    enable_script_checks: bool = False,
) -> NodeCheck:
    body = check_body(raw, enable_script_checks=enable_script_checks)
    return NodeCheck(id=str(body["CheckID"]), body=body, token=token, source=source)


def catalog_check(body: Mapping[str, Any], status: str, output: str) -> dict[str, Any]:
    """What the catalog is sent for a check: its definition fields and its current result.
    ``TTL`` stays on the agent: the agent runs the TTL, and the server would expire the check
    again on its own clock if it had one."""
    out = {k: body[k] for k in CATALOG_CHECK_FIELDS if k in body}
    out["Status"] = status
    out["Output"] = output
    out["Type"] = check_kind(body)
    return out
