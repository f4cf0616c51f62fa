"""The agent's HTTP API on its node: ``/v1/agent/...`` answered from local state, the rest
forwarded to a server.

Answered here: service and check registration (written through to the catalog with the
caller's token first, so the servers' ACLs decide; a 403 there is the caller's 403), the
local reads (``agent/services`` with hash-based blocking, ``agent/service/{id}``,
``agent/checks``, ``agent/self``, ``agent/members``), TTL check updates, ``reload`` and
``leave`` (``agent:write``, node:write on this node, as in Consul),
``agent/version``, this host's ``agent/host`` (``operator:read``) and this agent's
``agent/metrics`` (``agent:read``, node:read on this node). The agent holds no ACL
rules: the servers decide each of these for the caller's token (``LocalAPI.authorize``), and
when none answers the agent refuses (503). Forwarded: everything else under ``/v1/`` (K/V,
catalog, health, the Connect CA and ``agent/connect/*``), with the caller's headers and
token, the server's status, headers and body passed back as they come; a blocking query
blocks the same way, and a client that hangs up cancels its forwarded request.

Shared (``trellis.proxy.agent.shared``): the CA roots, every read of them, come from the node's
one roots watch; a blocking read (``?index=``) of the catalog, health, K/V or intentions
shares one watch on the servers with the identical reads of other local clients (same path,
query and token). A non-blocking read of those is forwarded, and answered from the shared
watch when no server answers (fail static).

The agent of ``trellis dev`` (``Options.dev``) owns the API address users know, in front of a
server of its own node: it forwards the ``/v1/agent/`` paths it does not answer too, and
refuses what dev's server refuses from web pages, which behind the agent sees only the
agent's ``Host``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import h11
import trio

from trellis.api import __version__, browsers, telemetry
from trellis.api import events as user_events
from trellis.api import maintenance as maint
from trellis.api.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    TrellisError,
)
from trellis.proxy.agent.core import Agent, WriteRefused
from trellis.proxy.agent.definitions import (
    DefinitionError,
    ServiceDef,
    catalog_check,
    node_check,
    service_def,
)
from trellis.proxy.agent.definitions import (
    check_kind as check_kind_of,
)
from trellis.proxy.agent.httpd import Request, Response, json_response
from trellis.proxy.agent.ports import CRITICAL, PASSING, WARNING
from trellis.proxy.agent.shared import (
    ROOTS_KEY,
    ROOTS_PATH,
    Answer,
    Headers,
    SharedReads,
    key_of,
)
from trellis.proxy.agent.shared import Unreachable as SharedUnreachable
from trellis.proxy.agent.upstream import HOP_BY_HOP, Unreachable
from trellis.proxy.bexpr import Filter, FilterError, Struct
from trellis.proxy.bexpr import parse_optional as parse_filter
from trellis.proxy.durations import DurationError, parse_duration
from trellis.proxy.filtershapes import AGENT_MEMBER, AGENT_SERVICE, HEALTH_CHECK, omit_empty
from trellis.proxy.requestrules import (
    FieldNameError,
    Shape,
    fold_names,
    parse_bool,
    split_request_options,
)

log = logging.getLogger("trellis.agent")

DEFAULT_WAIT, MAX_WAIT = 300.0, 600.0
MAX_OUTPUT = 4096


class NoServer(TrellisError):
    status = 503
    code = "no_server"


class Refused(TrellisError):
    """A server's refusal of a write-through, passed on with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = {400: "bad_request", 403: "permission_denied", 404: "not_found"}.get(
            status, "refused"
        )


def content_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def wait_arg(req: Request) -> float:
    v = req.arg("wait")
    if v is None or not v.strip():
        return DEFAULT_WAIT
    try:
        return min(parse_duration(v), MAX_WAIT)
    except DurationError as e:
        raise BadRequest(f"query parameter 'wait': {e}") from None


class _Headers(Mapping[str, str]):
    """A request's headers as ``trellis.api.browsers.refusal`` reads them (any case)."""

    def __init__(self, req: Request) -> None:
        self._req = req

    def __getitem__(self, name: str) -> str:
        v = self._req.header(name)
        if v is None:
            raise KeyError(name)
        return v

    def __iter__(self) -> Iterator[str]:
        return (k.decode("latin-1") for k, _ in self._req.headers)

    def __len__(self) -> int:
        return len(self._req.headers)


def _mimetype(req: Request) -> str:
    return (req.header("content-type") or "").split(";", 1)[0].strip().lower()


def _refused(e: WriteRefused) -> TrellisError:
    if e.status == 403:
        return PermissionDenied(e.message)
    return Refused(e.status, e.message)


Route = Callable[[Request, str], Awaitable[Response]]
#: ``agent/check/update``'s body (the servers' CheckUpdateSchema).
CHECK_UPDATE = Shape("CheckUpdate", {"Status": None, "Output": None})

#: Forwarded reads whose blocking form is shared between local clients: the reads a sidecar
#: follows (health, intentions), and the other index-blocking reads that answer the same to
#: the same token whoever asks.
SHARED_PREFIXES = ("/v1/health/", "/v1/catalog/", "/v1/kv/", "/v1/connect/intentions")
#: Query arguments a roots read may carry and still be the node's roots watch's answer.
ROOTS_ARGS = frozenset({"index", "wait", "token", "stale", "consistent", "cached"})


class LocalAPI:
    def __init__(
        self,
        agent: Agent,
        *,
        on_leave: Callable[[], None],
        shared: SharedReads | None = None,
    ) -> None:
        self.agent = agent
        self.on_leave = on_leave
        self.shared = shared
        exact: dict[tuple[str, str], Route] = {
            ("PUT", "/v1/agent/service/register"): self.service_register,
            ("GET", "/v1/agent/services"): self.services,
            ("GET", "/v1/agent/checks"): self.checks,
            ("PUT", "/v1/agent/check/register"): self.check_register,
            ("GET", "/v1/agent/self"): self.self_,
            ("PUT", "/v1/agent/reload"): self.reload,
            ("PUT", "/v1/agent/leave"): self.leave,
            ("GET", "/v1/agent/members"): self.members,
            ("PUT", "/v1/agent/maintenance"): self.node_maintenance,
            ("GET", "/v1/event/list"): self.event_list,
            ("GET", "/v1/agent/version"): self.version,
            ("GET", "/v1/agent/host"): self.host,
            ("GET", "/v1/agent/metrics"): self.metrics,
        }
        self.started = time.time()
        self.exact = exact
        self.prefixed: list[tuple[str, str, Route]] = [
            # Before "/v1/agent/service/" (a GET), which it would otherwise fall under.
            ("PUT", "/v1/agent/service/maintenance/", self.service_maintenance),
            ("PUT", "/v1/agent/service/deregister/", self.service_deregister),
            ("GET", "/v1/agent/service/", self.service),
            ("PUT", "/v1/agent/check/deregister/", self.check_deregister),
            ("PUT", "/v1/agent/check/pass/", self.check_pass),
            ("PUT", "/v1/agent/check/warn/", self.check_warn),
            ("PUT", "/v1/agent/check/fail/", self.check_fail),
            ("PUT", "/v1/agent/check/update/", self.check_update),
        ]

    async def handle(self, req: Request) -> Response:
        if self.agent.opts.dev:
            # dev's server sees only the agent's Host (an IP address): the agent is the one
            # that can tell a rebound name, for the requests it forwards and those it answers.
            why = browsers.refusal(
                req.method,
                _Headers(req),
                _mimetype(req),
                dev=True,
                listen_host=self.agent.opts.bind,
            )
            if why is not None:
                raise PermissionDenied(why)
        route = self.exact.get((req.method, req.path))
        if route is not None:
            if route not in (self.services, self.checks, self.members):
                _refuse_filter(req)
            return await route(req, "")
        for method, prefix, r in self.prefixed:
            if req.path.startswith(prefix) and len(req.path) > len(prefix):
                if req.method != method:
                    raise MethodNotAllowed(f"{req.method} is not allowed on {req.path}")
                _refuse_filter(req)
                return await r(req, req.path[len(prefix) :])
        if any(req.path == p for _, p in self.exact):
            raise MethodNotAllowed(f"{req.method} is not allowed on {req.path}")
        if (
            req.path.startswith("/v1/agent/")
            and not req.path.startswith("/v1/agent/connect/")
            and not self.agent.opts.dev  # dev's server is on this node: it may answer
        ):
            raise NotFound(f"{req.path} is not served by the node agent")
        if not req.path.startswith("/v1/") and req.path not in ("/", "/ui"):
            raise NotFound(f"unknown path {req.path}")
        if req.method == "PUT" and req.path == "/v1/session/create":
            req = self._session_on_this_node(req)
        if self.shared is not None and req.method == "GET":
            if (
                req.path in (ROOTS_PATH, "/v1/agent/connect/ca/roots")
                and set(req.query) <= ROOTS_ARGS
            ):
                return await self.roots(req, self.shared)
            if req.path.startswith(SHARED_PREFIXES):
                return await self.shared_read(req, self.shared)
        return await self.forward(req)

    # -- forwarding -----------------------------------------------------------------------

    def _session_on_this_node(self, req: Request) -> Request:
        """A session created through an agent belongs to the agent's node, as in Consul
        (whose agent fills in its node name when the body names none): its node checks
        (serfHealth by default) and its ``session:write`` ACL are this node's. Forwarded
        unchanged, the server filled in its own node instead. A body that is not a JSON
        object is forwarded as it came, for the server to refuse."""
        try:
            body = json.loads(req.body) if req.body.strip() else {}
        except ValueError:
            return req
        if not isinstance(body, dict) or any(
            isinstance(k, str) and k.lower() == "node" for k in body
        ):
            return req
        body["Node"] = self.agent.opts.node
        return dataclasses.replace(req, body=json.dumps(body).encode())

    async def forward(self, req: Request) -> Response:
        head_timeout = 60.0
        if req.arg("index") or req.arg("hash"):
            head_timeout = wait_arg(req) * 1.1 + 30.0
        headers = [(k, v) for k, v in req.headers if k not in HOP_BY_HOP]
        try:
            ex = await self.agent.servers.open(
                req.method,
                req.target,
                headers=headers,
                body=req.body,
                head_timeout=head_timeout,
                retry_5xx=req.method in ("GET", "HEAD"),
            )
        except Unreachable as e:
            raise NoServer(f"no server answered: {e}") from None
        out = [(k, v) for k, v in ex.headers if k.lower() not in HOP_BY_HOP]
        length = ex.header(b"content-length")
        return Response(
            ex.status,
            out,
            stream=ex.body(),
            close=ex.close,
            length=int(length) if length and length.isdigit() else None,
        )

    # -- shared reads ---------------------------------------------------------------------

    async def roots(self, req: Request, shared: SharedReads) -> Response:
        """A blocking read of the CA roots from the node's one roots watch (roots need no
        ACL: see ``shared.ROOTS_KEY``). A non-blocking one is forwarded, so that a client
        reads its own rotation (``trellis ca rotate`` then ``trellis ca roots``), and is
        answered from the watch (marked stale) when no server answers."""
        if not _index_arg(req):
            try:
                return await self.forward(req)
            except NoServer:
                held = shared.held(ROOTS_KEY)
                if held is None:
                    raise
                return _answer_response(held)
        try:
            a = await shared.read(
                ROOTS_KEY,
                ROOTS_PATH,
                (),
                min_index=_index_arg(req),
                wait=wait_arg(req),
                pinned=True,
                verify=False,
            )
        except SharedUnreachable as e:
            raise NoServer(f"no server answered: {e}") from None
        return _answer_response(a)

    async def shared_read(self, req: Request, shared: SharedReads) -> Response:
        """A blocking read shares its key's watch; a non-blocking one is forwarded, and
        answered from the key's watch (marked stale) when no server answers."""
        token = req.token()
        key = key_of(req.path, req.query, token)
        min_index = _index_arg(req)
        if not min_index:
            try:
                return await self.forward(req)
            except NoServer:
                held = shared.held(key)
                if held is None:
                    raise
                return _answer_response(held)
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in key[1])
        raw_path = req.target.split("?", 1)[0]
        target = raw_path + ("?" + query if query else "")
        headers = ((b"x-consul-token", token.encode()),) if token else ()
        try:
            a = await shared.read(key, target, headers, min_index=min_index, wait=wait_arg(req))
        except SharedUnreachable as e:
            raise NoServer(f"no server answered: {e}") from None
        return _answer_response(a)

    # -- services -------------------------------------------------------------------------

    def _service_json(
        self, sid: str, services: Mapping[str, ServiceDef] | None = None
    ) -> dict[str, Any] | None:
        # ``services`` is the node's services computed once by a caller that lists them all:
        # computing them builds every managed sidecar's registration, so doing it per service
        # made a listing quadratic, and 50 sidecars watching it kept the agent at 100% CPU.
        s = (self.agent.state.services() if services is None else services).get(sid)
        if s is None:
            return None
        b = s.body
        weights = b.get("Weights") or {"Passing": 1, "Warning": 1}
        out: dict[str, Any] = {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(b.get("Tags") or []),
            "Meta": dict(b.get("Meta") or {}),
            "Port": b.get("Port") or 0,
            "Address": b.get("Address") or "",
            "TaggedAddresses": dict(b.get("TaggedAddresses") or {}),
            "Weights": weights,
            "EnableTagOverride": bool(b.get("EnableTagOverride", False)),
            "Datacenter": self.agent.datacenter,
            "Kind": b.get("Kind") or "",
        }
        if b.get("Proxy"):
            out["Proxy"] = b["Proxy"]
        if b.get("Connect") is not None:
            out["Connect"] = b["Connect"]
        if b.get("Locality"):
            # Kept as the definition gave it (Consul: omitted when empty).
            out["Locality"] = b["Locality"]
        return out

    def _services_json(self) -> dict[str, Any]:
        out = {}
        services = self.agent.state.services()
        for sid in sorted(services):
            d = self._service_json(sid, services)
            if d is not None:
                out[sid] = d
        return out

    async def _hash_blocking(self, req: Request, compute: Callable[[], Any]) -> tuple[Any, str]:
        value = compute()
        h = content_hash(value)
        want = req.arg("hash")
        if want:
            deadline = trio.current_time() + wait_arg(req)
            while h == want and trio.current_time() < deadline:
                await self.agent.wait_changed(deadline - trio.current_time())
                value = compute()
                h = content_hash(value)
        return value, h

    async def services(self, req: Request, _: str) -> Response:
        flt = _filter_arg(req, AGENT_SERVICE)  # before blocking: a bad one is a 400 at once
        value, h = await self._hash_blocking(req, self._services_json)
        if flt is not None:
            value = {k: v for k, v in value.items() if flt(v)}
        value = {k: omit_empty(v) for k, v in value.items()}
        return json_response(value, headers=[(b"x-consul-contenthash", h.encode())])

    async def service(self, req: Request, sid: str) -> Response:
        value, h = await self._hash_blocking(req, lambda: self._service_json(sid))
        if value is None:
            raise NotFound(f"unknown service ID: {sid}")
        value = omit_empty(value)
        value["ContentHash"] = h
        return json_response(value, headers=[(b"x-consul-contenthash", h.encode())])

    async def service_register(self, req: Request, _: str) -> Response:
        body, body_token = _registration_body(req)
        token = req.token()
        try:
            svc = service_def(
                body, token=token, enable_script_checks=self.agent.opts.enable_script_checks
            )
        except DefinitionError as e:
            raise BadRequest(str(e)) from None
        if not _flag(req, "replace-existing-checks"):
            # Consul keeps the checks of an earlier registration of the ID that this one
            # does not name; ?replace-existing-checks drops them.
            old = self.agent.state.api_services.get(svc.id)
            if old is not None and old.checks:
                mine = {str(c["CheckID"]) for c in svc.checks}
                kept = tuple(c for c in old.checks if str(c["CheckID"]) not in mine)
                if kept:
                    svc = dataclasses.replace(svc, checks=svc.checks + kept)
        try:
            await self.agent.api_register(svc, body_token=body_token)
        except WriteRefused as e:
            raise _refused(e) from None
        except OSError as e:
            raise NoServer(f"cannot persist the registration: {e}") from None
        return json_response(None)

    async def service_deregister(self, req: Request, sid: str) -> Response:
        try:
            found = await self.agent.api_deregister(sid, req.token())
        except WriteRefused as e:
            raise _refused(e) from None
        if not found:
            raise NotFound(f"Unknown service ID {sid!r}")
        return json_response(None)

    # -- checks ---------------------------------------------------------------------------

    def _checks_json(self) -> dict[str, Any]:
        st = self.agent.state
        svcs = st.services()
        out = {}
        for cid, (body, _) in sorted(st.checks().items()):
            r = st.result(cid, body)
            c = catalog_check(body, r.status, r.output)
            sid = str(body.get("ServiceID") or "")
            s = svcs.get(sid)
            out[cid] = {
                "Node": self.agent.opts.node,
                "CheckID": cid,
                "Name": c.get("Name", cid),
                "Status": r.status,
                "Notes": c.get("Notes", ""),
                "Output": r.output,
                "ServiceID": sid,
                "ServiceName": s.name if s else "",
                "ServiceTags": list(s.body.get("Tags") or []) if s else [],
                "Type": c["Type"],
                "Definition": {k: v for k, v in body.items() if k not in ("CheckID", "Name")},
                "CreateIndex": 0,
                "ModifyIndex": 0,
            }
        # Maintenance checks live in the catalog only (see Agent.maintenance).
        for cid, c in sorted(self.agent.maintenance.items()):
            out[cid] = {**c, "ServiceTags": list(c.get("ServiceTags") or [])}
        return out

    async def checks(self, req: Request, _: str) -> Response:
        flt = _filter_arg(req, HEALTH_CHECK)
        value = self._checks_json()
        if flt is not None:
            value = {k: v for k, v in value.items() if flt(v)}
        return json_response(value)

    async def check_register(self, req: Request, _: str) -> Response:
        body, body_token = _registration_body(req)
        token = req.token()
        try:
            c = node_check(
                body, token=token, enable_script_checks=self.agent.opts.enable_script_checks
            )
        except DefinitionError as e:
            raise BadRequest(str(e)) from None
        sid = str(c.body.get("ServiceID") or "")
        svcs = self.agent.state.services()
        if sid and sid not in svcs:
            raise NotFound(f"ServiceID {sid!r} does not exist")
        result = self.agent.state.result(c.id, c.body)
        if sid in self.agent.state.synced_services or not sid:
            try:
                await self.agent.register_check(
                    c.id,
                    catalog_check(c.body, result.status, result.output),
                    token,
                    body_token=body_token,
                )
            except WriteRefused as e:
                raise _refused(e) from None
            except Unreachable:
                pass
        try:
            self.agent.state.add_check(c)
        except OSError as e:
            raise NoServer(f"cannot persist the registration: {e}") from None
        self.agent.changed()
        return json_response(None)

    async def check_deregister(self, req: Request, cid: str) -> Response:
        st = self.agent.state
        if cid not in st.checks():
            raise NotFound(f"Unknown check ID {cid!r}")
        if cid in st.synced_checks:
            try:
                await self.agent.deregister_check(cid, req.token(), fallback=False)
            except WriteRefused as e:
                raise _refused(e) from None
            except Unreachable:
                pass
        if not st.remove_check(cid):
            raise BadRequest(
                f"check {cid!r} belongs to a service definition: change the service instead"
            )
        self.agent.changed()
        return json_response(None)

    async def _ttl(self, req: Request, cid: str, status: str, output: str) -> Response:
        """A TTL update. Written through to the catalog with the caller's token first when
        the check is there, so that the servers' ACLs decide who may set it (service:write
        on its service, node:write for a node check); no server: applied locally."""
        if len(output) > MAX_OUTPUT:
            output = output[:MAX_OUTPUT] + " ... (Output exceeded 4096 bytes)"
        st = self.agent.state
        entry = st.checks().get(cid)
        if entry is None:
            raise NotFound(f"Unknown check ID {cid!r}")
        body, _ = entry
        if check_kind_of(body) != "ttl":
            raise BadRequest(f"check {cid!r} is not a TTL check")
        if cid in st.synced_checks:
            try:
                await self.agent.register_check(
                    cid, catalog_check(body, status, output), req.token()
                )
            except WriteRefused as e:
                raise _refused(e) from None
            except Unreachable:
                pass
        if not self.agent.runner.ttl_update(cid, status, output):
            raise BadRequest(f"check {cid!r} is not a TTL check")
        return json_response(None)

    async def check_pass(self, req: Request, cid: str) -> Response:
        return await self._ttl(req, cid, PASSING, req.arg("note") or "")

    async def check_warn(self, req: Request, cid: str) -> Response:
        return await self._ttl(req, cid, WARNING, req.arg("note") or "")

    async def check_fail(self, req: Request, cid: str) -> Response:
        return await self._ttl(req, cid, CRITICAL, req.arg("note") or "")

    async def check_update(self, req: Request, cid: str) -> Response:
        body = req.json() if req.body.strip() else {}
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        unknown: list[str] = []
        try:
            body = fold_names(CHECK_UPDATE, split_request_options(body).body, unknown=unknown)
        except FieldNameError as e:
            raise BadRequest(str(e)) from None
        if unknown:
            raise BadRequest(f"{unknown[0]}: Unknown field.")
        status = body.get("Status")
        output = body.get("Output") or ""
        if status not in (PASSING, WARNING, CRITICAL):
            raise BadRequest("Status must be passing, warning or critical")
        if not isinstance(output, str):
            raise BadRequest("Output must be a string")
        return await self._ttl(req, cid, status, output)

    # -- maintenance mode -----------------------------------------------------------------

    async def _maintenance(self, req: Request, check: dict[str, Any], enable: bool) -> Response:
        """Write a maintenance check through to the catalog, where it lives (see
        ``Agent.set_maintenance``); without a server it cannot be, so that is a 503."""
        try:
            await self.agent.set_maintenance(check, enable, req.token())
        except WriteRefused as e:
            raise _refused(e) from None
        except Unreachable as e:
            raise NoServer(f"no server answered: {e}") from None
        return json_response(None)

    async def node_maintenance(self, req: Request, _: str) -> Response:
        enable = maint.parse_enable(req.arg("enable"))
        reason = maint.check_reason(req.arg("reason"))
        return await self._maintenance(req, maint.node_check(reason), enable)

    async def service_maintenance(self, req: Request, sid: str) -> Response:
        enable = maint.parse_enable(req.arg("enable"))
        reason = maint.check_reason(req.arg("reason"))
        if sid not in self.agent.state.services():
            raise NotFound(f"Unknown service ID {sid!r}")
        return await self._maintenance(req, maint.service_check(sid, reason), enable)

    # -- events -----------------------------------------------------------------------------

    async def event_list(self, req: Request, _: str) -> Response:
        """The events this node processes, as a Consul agent lists them: the servers' list
        (the cluster's history, with the caller's token: event:read), less the events whose
        node, service or tag filter does not match this node and its services. The index is
        the listing's own (trellis.api.events); a blocking list follows the servers' list
        with blocking reads of its own until this node's listing changes or the wait ends."""
        want = _index_arg(req)
        deadline = trio.current_time() + wait_arg(req)
        query = [
            f"{quote(k, safe='')}={quote(v, safe='')}"
            for k, vs in req.query.items()
            if k not in ("index", "wait")
            for v in vs
        ]
        server_index = 0
        while True:
            remaining = deadline - trio.current_time()
            q = list(query)
            if want and server_index and remaining > 0:
                q += [f"index={server_index}", f"wait={max(1, int(remaining))}s"]
            target = "/v1/event/list" + ("?" + "&".join(q) if q else "")
            try:
                status, value, ex = await self.agent.servers.call(
                    "GET", target, token=req.token(), timeout=max(30.0, remaining * 1.1 + 30.0)
                )
            except Unreachable as e:
                raise NoServer(f"no server answered: {e}") from None
            if status != 200 or not isinstance(value, list):
                raise Refused(status, _message_of(value))
            svcs = [
                (s.name, [str(t) for t in s.body.get("Tags") or []])
                for s in self.agent.state.services().values()
            ]
            mine = [
                e
                for e in value
                if isinstance(e, dict) and user_events.processes(e, self.agent.opts.node, svcs)
            ]
            index = user_events.list_index(mine)
            if not want or index != want or trio.current_time() >= deadline:
                headers = [(b"x-consul-index", str(index).encode())]
                if ex is not None and ex.header(b"x-consul-results-filtered-by-acls"):
                    headers.append((b"x-consul-results-filtered-by-acls", b"true"))
                return json_response(mine, headers=headers)
            got = ex.header(b"x-consul-index") if ex is not None else None
            server_index = int(got) if got and got.isdigit() else 1

    # -- the agent itself -----------------------------------------------------------------

    async def self_(self, req: Request, _: str) -> Response:
        own = self._self_json()
        if self.agent.opts.dev:
            # dev's node is one agent and one server, as a Consul agent in dev mode is: the
            # server's self (its config, store and blocking stats, under its ACL check) with
            # this agent's own counts; the agent's alone only if the server does not answer.
            try:
                status, value, _ = await self.agent.servers.call(
                    "GET", "/v1/agent/self", token=req.token()
                )
            except Unreachable:
                return json_response(own)
            if status == 200 and isinstance(value, dict) and isinstance(value.get("Stats"), dict):
                value["Stats"]["agent"] = own["Stats"]["agent"]
                # This agent's member entry, as its agent/members lists it.
                value["Member"] = own["Member"]
            return json_response(value, status)
        return json_response(own)

    def _self_json(self) -> dict[str, Any]:
        a = self.agent
        # dev's agent fronts a server of its own node: that node is a server member, as a
        # Consul agent in dev mode is (``trellis members`` reads this).
        server = a.opts.dev
        return {
            "Config": {
                "Datacenter": a.datacenter,
                "NodeName": a.opts.node,
                "NodeID": "",
                "Server": server,
                "Revision": "",
                "Version": __version__,
                "PrimaryDatacenter": a.datacenter,
            },
            "DebugConfig": {
                # The subset clients read, with what this agent really runs.
                "Datacenter": a.datacenter,
                "PrimaryDatacenter": a.datacenter,
                "NodeName": a.opts.node,
                "ServerMode": server,
                "Revision": "",
                "Version": __version__,
                "HTTPPort": a.opts.http_port,
                "HTTPSPort": -1,
                "GRPCPort": -1,
                "GRPCTLSPort": -1,
                "ClientAddrs": [a.opts.bind],
                "BindAddr": a.opts.bind,
                "AdvertiseAddrLAN": a.opts.address,
                "ConnectEnabled": True,
                "EnableDebug": False,
                "EnableScriptChecks": a.opts.enable_script_checks,
            },
            "Member": self._own_member(),
            "Meta": {},
            "Stats": {
                "agent": {
                    "services": str(len(a.state.services())),
                    "checks": str(len(a.state.checks())),
                    "server": a.servers.address,
                    "syncs": str(a.syncs),
                    # One blocking query each on a server (the shared reads).
                    "shared_watches": str(self.shared.watching() if self.shared else 0),
                }
            },
        }

    def _own_member(self, status: int = 1) -> dict[str, Any]:
        """This node as a member: the same in agent/self and agent/members."""
        a = self.agent
        # dev's agent fronts a server of its own node (see _self_json).
        return {
            "Name": a.opts.node,
            "Addr": a.opts.address,
            "Port": 8301,
            "Tags": {
                "role": "consul" if a.opts.dev else "node",
                "dc": a.datacenter,
                "build": __version__,
            },
            "Status": status,
        }

    async def version(self, req: Request, _: str) -> Response:
        return json_response({"SHA": "", "BuildDate": "", "HumanVersion": __version__, "FIPS": ""})

    async def host(self, req: Request, _: str) -> Response:
        """This node's host (``operator:read``, as on the servers), asked of the servers
        (``authorize``). It used to borrow ``GET operator/autopilot/configuration``, which
        needs the same and changes nothing; the servers' own question is plainer."""
        await self.authorize(req, "operator", "read")
        return json_response(telemetry.host_info(time.time(), self.started))

    async def authorize(self, req: Request, resource: str, access: str, segment: str = "") -> None:
        """Refuse unless the caller's token may ``access`` ``resource``: the agent holds no ACL
        rules, so it asks the servers (``POST /v1/internal/acl/authorize``, which decides by
        the Authorizer every server endpoint uses and changes nothing). Their 403 (an
        unknown token, or ``Allow: false``) is the caller's 403; their 401 "ACL support
        disabled" means ACLs are off and everything is allowed. No server answering, or an
        answer the agent cannot read (a server too old to have the endpoint), is a 503:
        never allowed by default."""
        ask: dict[str, str] = {"Resource": resource, "Access": access}
        if segment:
            ask["Segment"] = segment
        try:
            status, value, _ = await self.agent.servers.call(
                "POST", "/v1/internal/acl/authorize", token=req.token(), json_body=[ask]
            )
        except Unreachable as e:
            raise NoServer(f"no server answered whether the token may do this: {e}") from None
        if status == 401 and isinstance(value, dict) and value.get("code") == "acl_disabled":
            return
        if status == 403:
            raise PermissionDenied(_message_of(value))
        if (
            status != 200
            or not isinstance(value, list)
            or len(value) != 1
            or not isinstance(value[0], dict)
        ):
            raise NoServer(
                f"the servers could not say whether the token may do this (HTTP {status}:"
                f" {_message_of(value)})"
            )
        if value[0].get("Allow") is not True:
            on = f" on {segment!r}" if segment else ""
            raise PermissionDenied(
                f"Permission denied: token lacks permission '{resource}:{access}'{on}"
            )

    async def metrics(self, req: Request, _: str) -> Response:
        """This agent's own figures (``agent:read``, node:read on this node, asked of the
        servers): gauges of its services, checks and shared watches, and this process's
        memory and open files, in Consul's JSON or (``?format=prometheus``) Prometheus text.
        The agent counts no requests, so Counters and Samples are empty rather than made up.
        dev's agent passes the request to dev's server, whose figures are the node's."""
        if self.agent.opts.dev:
            return await self.forward(req)
        await self.authorize(req, "agent", "read", self.agent.opts.node)
        fmt = req.arg("format") or ""
        if fmt not in ("", "prometheus"):
            raise BadRequest(
                f"query parameter 'format' must be 'prometheus' or absent, not {fmt[:64]!r}"
            )
        state = self.agent.state
        gauges: list[tuple[str, float, Mapping[str, str]]] = [
            ("agent.services", float(len(state.services())), {}),
            ("agent.checks", float(len(state.checks())), {}),
            ("agent.shared_watches", float(self.shared.watching() if self.shared else 0), {}),
            *telemetry.process_gauges(),
        ]
        figures = telemetry.Metrics(started=self.started)
        if fmt == "prometheus":
            return Response(
                200,
                [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
                figures.to_prometheus(gauges).encode(),
            )
        return json_response(figures.to_json(gauges, time.time()))

    async def reload(self, req: Request, _: str) -> Response:
        """``agent:write`` on this node (Consul's rule), asked of the servers."""
        await self.authorize(req, "agent", "write", self.agent.opts.node)
        errors = await self.agent.reload()
        if errors:
            # The other files were applied; the caller learns which were refused and why.
            raise BadRequest("refused: " + "; ".join(errors))
        return json_response(None)

    async def leave(self, req: Request, _: str) -> Response:
        """``agent:write`` on this node (node:write), asked of the servers: Consul's rule for
        a graceful leave (its AgentLeave; ``operator:write`` is force-leave's, of another
        node). Any local process could otherwise make the node leave."""
        await self.authorize(req, "agent", "write", self.agent.opts.node)
        self.on_leave()
        return json_response(None)

    async def members(self, req: Request, _: str) -> Response:
        flt = _filter_arg(req, AGENT_MEMBER)
        try:
            status, nodes, _ = await self.agent.servers.call(
                "GET", "/v1/catalog/nodes", token=req.token()
            )
            _, checks, _ = await self.agent.servers.call(
                "GET", "/v1/health/state/any", token=req.token()
            )
        except Unreachable as e:
            raise NoServer(f"no server answered: {e}") from None
        if status != 200 or not isinstance(nodes, list):
            raise Refused(status, str(nodes))
        health = {
            c["Node"]: c
            for c in (checks or [])
            if isinstance(c, dict) and c.get("CheckID") == "serfHealth"
        }
        out = []
        for n in nodes:
            st = member_status(health.get(n["Node"]))
            if (
                n["Node"] == self.agent.opts.node
                and n.get("Datacenter", "") == self.agent.datacenter
            ):
                # The same entry as agent/self's Member: clients match the two.
                out.append(self._own_member({"alive": 1, "left": 3, "failed": 4}[st]))
                continue
            out.append(
                {
                    "Name": n["Node"],
                    "Addr": n.get("Address", ""),
                    "Port": 8301,
                    "Tags": {
                        "dc": n.get("Datacenter", ""),
                        # dev's own node runs the server (see self_).
                        "role": "consul"
                        if self.agent.opts.dev and n["Node"] == self.agent.opts.node
                        else "node",
                    },
                    "Status": {"alive": 1, "left": 3, "failed": 4}[st],
                }
            )
        if flt is not None:
            out = flt.select(out)
        return json_response(out)


def _message_of(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"]
    return str(value)[:300]


def _index_arg(req: Request) -> int | None:
    """``?index=`` as the servers read it: ASCII digits, at most 2**64-1 (a 400 otherwise,
    the caller's fault); None when absent."""
    v = req.arg("index")
    if v is None:
        return None
    v = v.strip()
    if not (v.isascii() and v.isdigit()):
        raise BadRequest(f"query parameter 'index' must be a whole number >= 0, not {v!r}")
    digits = v.lstrip("0") or "0"
    if len(digits) > 20 or int(digits) > 2**64 - 1:
        raise BadRequest(f"query parameter 'index' must be at most {2**64 - 1}")
    return int(digits)


def server_fetch(agent: Agent) -> Callable[[str, Headers, float], Awaitable[Answer]]:
    """The shared reads' way to the servers: one whole GET through ``agent.servers``
    (failover included); the answer's hop-by-hop headers dropped. Raises shared.Unreachable."""

    async def fetch(target: str, headers: Headers, head_timeout: float) -> Answer:
        servers = agent.servers
        try:
            ex = await servers.open("GET", target, headers=list(headers), head_timeout=head_timeout)
        except Unreachable as e:
            raise SharedUnreachable(str(e)) from None
        try:
            with trio.fail_after(60.0):
                body = await ex.read()
        except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as e:
            raise SharedUnreachable(f"{ex.server}: {type(e).__name__}: {e}") from None
        finally:
            await ex.close()
        out = tuple((k, v) for k, v in ex.headers if k.lower() not in HOP_BY_HOP)
        return Answer(ex.status, out, body)

    return fetch


def _answer_response(a: Answer) -> Response:
    return Response(a.status, list(a.headers), a.body)


def member_status(check: dict[str, Any] | None) -> str:
    """alive, left or failed, from a node's serfHealth check (none: alive)."""
    if check is None or check.get("Status") == PASSING:
        return "alive"
    if "left" in str(check.get("Output") or ""):
        return "left"
    return "failed"


def _registration_body(req: Request) -> tuple[dict[str, Any], str]:
    """A registration's body, less its ``WriteRequest``/``QueryOptions`` (Consul ignores
    them, as the servers do), and the token one of them carried when the request itself
    carries none. That token is passed on with the write-through to the server, whose rule
    then decides, as for a body sent to it directly: ignored with ACLs off, a 400 saying
    where to send it with ACLs on. A body that is not an object is the client's fault."""
    body = req.json()
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        split = split_request_options(body)
    except FieldNameError as e:
        raise BadRequest(str(e)) from None
    return split.body, "" if req.token() else split.token


def _flag(req: Request, name: str) -> bool:
    """A query flag that takes a value, read as the servers read it (Go's ParseBool, no
    value being true: ``trellis.proxy.requestrules.parse_bool``); anything else is the
    client's fault."""
    if not req.has(name):
        return False
    v = req.arg(name) or ""
    value = parse_bool(v)
    if value is None:
        raise BadRequest(
            f"query parameter {name!r} must be true or false (or no value, which is true),"
            f" not {v[:64]!r}"
        )
    return value


def _filter_arg(req: Request, shape: Struct) -> Filter | None:
    """The request's ``?filter=`` (Consul's language, as the servers read it); the client
    wrote it, so a bad one is a 400 that says where."""
    try:
        return parse_filter(req.query.get("filter", []), shape)
    except FilterError as e:
        raise BadRequest(f"query parameter 'filter': {e}") from None


def _refuse_filter(req: Request) -> None:
    """``?filter=`` on a local endpoint that does not evaluate it is a 400, as on the servers
    (trellis.api.http.refuse_filter): never results that look filtered and are not. Forwarded
    requests are left to the server, which answers the same way."""
    if any(v.strip() for v in req.query.get("filter", [])):
        raise BadRequest(
            "query parameter 'filter' is not supported on this endpoint (Consul does not"
            " filter it either); Trellis refuses it rather than return results that look"
            " filtered and are not: leave out 'filter'"
        )
