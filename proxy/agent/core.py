"""The node agent's spine: local state, anti-entropy with the servers, and the glue to the
check runner and the sidecar supervisor. trio.

Theory of operation. ``LocalState`` is the truth for this node. Every local change (a reload,
an API registration, a check's new result) goes through ``changed``, which hands the runner
and the supervisor their whole desired sets and asks for a full sync. Four loops run:

* ``_sync_loop``: full anti-entropy (``sync.plan`` over the catalog's view of the node) when
  asked, and every ``sync_interval`` (jittered), retried with backoff while no server answers.
* ``_push_loop``: a check result that changed is written on its own (the runner reports only
  changes, so steady checks cost the servers nothing).
* ``_heartbeat_loop``: refreshes the node's ``serfHealth`` TTL check, which the server turns
  critical when the agent stops for ``node_ttl``; a refresh that succeeds after failures
  means the server may have come back empty, so it asks for a full sync (``Servers``
  ``on_recovered``).
* ``_watch_loop``: a blocking read of the catalog's view of the node: whoever changes it (a
  lost registration, a server restarted empty, whose index goes backwards) wakes a full sync.

The agent writes each service with the token it was registered with, else its own token.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import trio

from trellis.api.maintenance import is_maintenance_check
from trellis.proxy.agent import managed, sync
from trellis.proxy.agent.checks import CheckRefused
from trellis.proxy.agent.definitions import (
    DefinitionError,
    ServiceDef,
    load_config,
)
from trellis.proxy.agent.ports import CheckResult, CheckRunner, SidecarSpec, SidecarSupervisor
from trellis.proxy.agent.state import MANAGED, LocalState
from trellis.proxy.agent.upstream import Servers, Unreachable
from trellis.proxy.agent.wiring import LocalAlias
from trellis.proxy.config import ConfigError
from trellis.proxy.durations import format_duration

log = logging.getLogger("trellis.agent")


@dataclass
class Options:
    servers: list[str]
    node: str
    address: str = "127.0.0.1"
    config_dirs: list[str] = field(default_factory=list)
    config_files: list[str] = field(default_factory=list)
    data_dir: str | None = None
    token: str = ""
    ca_file: str | None = None
    bind: str = "127.0.0.1"
    http_port: int = 8500
    http_fd: int | None = None
    node_ttl: float = 30.0
    sync_interval: float = 60.0
    leave_on_terminate: bool = True
    enable_script_checks: bool = False
    #: Stop when this process is no longer the agent's parent (``trellis dev`` died).
    parent_pid: int | None = None
    #: The agent of ``trellis dev``: it owns the API address in front of a server of its own
    #: node, so it forwards the server's other ``/v1/agent/`` endpoints (they describe this
    #: node too) and refuses what dev's server refuses from web pages (``trellis.api.browsers``).
    dev: bool = False
    #: Managed sidecars' public ports (Consul's ``ports.proxy_min_port``..``proxy_max_port``).
    proxy_min_port: int = managed.PROXY_MIN_PORT
    proxy_max_port: int = managed.PROXY_MAX_PORT


class WriteRefused(Exception):
    """The server refused an agent write: ``status`` and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _message(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("error") or value)
    return str(value)


class Agent:
    def __init__(
        self,
        opts: Options,
        *,
        make_runner: Callable[..., CheckRunner],
        make_supervisor: Callable[[], SidecarSupervisor],
        out: Callable[[str], None] = print,
    ) -> None:
        self.opts = opts
        self.out = out
        self.state = LocalState(opts.data_dir, enable_script_checks=opts.enable_script_checks)
        self.servers = Servers(opts.servers, ca_file=opts.ca_file, on_recovered=self.request_sync)
        self.runner = make_runner(
            self._on_check_change,
            self._on_deregister,
            enable_script_checks=opts.enable_script_checks,
            alias=LocalAlias(lambda: self.url, token=opts.token, node=opts.node),
        )
        self.supervisor = make_supervisor()
        self.ports: managed.PortAllocator | None = None  # made once the data dir is read
        self._port_errors: dict[str, str] = {}
        self.url = ""  # the local API's URL, once it listens
        self.datacenter = "dc1"
        self._sync_wanted = trio.Event()
        self._push_wanted = trio.Event()
        self._dirty_checks: set[str] = set()
        self._changed = trio.Event()  # replaced on every change: the blocking local reads
        self.last_index = 0
        self.syncs = 0  # full syncs that completed (tests and /v1/agent/self)
        self.leaving = False
        #: The node's maintenance checks as the catalog last showed them (check ID -> the
        #: catalog's check JSON). They live in the catalog only (trellis.api.maintenance),
        #: never in the local state, so anti-entropy leaves them alone; this copy, refreshed
        #: by every full sync and by the local API's maintenance writes, is what
        #: ``/v1/agent/checks`` lists.
        self.maintenance: dict[str, dict[str, Any]] = {}

    # -- local changes --------------------------------------------------------------------

    def changed(self) -> None:
        """The services or checks changed: hand the runner and the supervisor their sets,
        wake the blocking local reads, and ask for a full sync."""
        self._assign_ports()
        try:
            self.runner.update(self.state.check_defs())
        except CheckRefused as e:
            # The definitions were checked when they came in; what the runner still refuses
            # does not run (the others do), and the operator hears why.
            for check_id, reason in e.refused.items():
                log.error("check %s does not run: %s", check_id, reason)
        self.supervisor.update(self.sidecars())
        self._changed.set()
        self._changed = trio.Event()
        self.request_sync()

    def _assign_ports(self) -> None:
        """Give every managed sidecar (the one-line ``connect.proxy`` form) its public port,
        keeping the ones they had (``LocalState.proxy_ports``, from the data dir); a sidecar
        that cannot have one is said once, with the reason, and its app runs without it."""
        if self.ports is None:
            self.ports = managed.PortAllocator(
                self.opts.proxy_min_port,
                self.opts.proxy_max_port,
                previous=self.state.proxy_ports,
            )
        wanted = []
        for app in self.state.managed_apps():
            pid = managed.proxy_id(app.body)
            try:
                port = managed.fixed_port(app.body)
                if port is None:
                    port = self.ports.assign(pid, managed.bind_address(app.body))
                    wanted.append(pid)
                managed.registration(app.body, port)  # what the sidecar would refuse
                self._port_errors.pop(pid, None)
            except ConfigError as e:
                if self._port_errors.get(pid) != str(e):
                    self._port_errors[pid] = str(e)
                    log.error("no managed sidecar for %s: %s", app.id, e)
        self.ports.retain(wanted)
        try:
            self.state.set_proxy_ports(self.ports.assigned())
        except OSError as e:
            log.error("cannot keep the sidecars' ports in the data dir: %s", e)

    def sidecars(self) -> dict[str, SidecarSpec]:
        """The managed sidecars to run: one per connect-proxy registration made for a
        one-line ``connect.proxy`` app, reading its configuration from this agent."""
        out = {}
        for s in self.state.services().values():
            if s.source.startswith(MANAGED):
                spec = managed.sidecar_spec(s.body, http_addr=self.url, token=s.token or None)
                out[spec.proxy_id] = spec
        return out

    def request_sync(self) -> None:
        self._sync_wanted.set()

    async def wait_changed(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._changed.wait()

    def _on_check_change(self, check_id: str, result: CheckResult) -> None:
        if self.state.set_result(check_id, result):
            self._changed.set()
            self._changed = trio.Event()
            self._dirty_checks.add(check_id)
            self._push_wanted.set()

    def _on_deregister(self, service_id: str) -> None:
        log.warning("service %s was critical too long: deregistering it", service_id)
        if self.state.remove_service(service_id):
            self.changed()

    def load_files(self) -> list[str]:
        """(Re-)read the config dirs and files; one message per refused file. A refused
        file's services keep running as they were (``keep``), the others are replaced."""
        defs, errors = load_config(
            self.opts.config_dirs,
            self.opts.config_files,
            token=self.opts.token,
            enable_script_checks=self.opts.enable_script_checks,
        )
        refused = {e.split(": ", 1)[0] for e in errors}
        kept_services = [s for s in self.state.file_services.values() if s.source in refused]
        kept_checks = [c for c in self.state.file_checks.values() if c.source in refused]
        new_ids = {s.id for s in defs.services}
        services = defs.services + [s for s in kept_services if s.id not in new_ids]
        new_cids = {c.id for c in defs.checks}
        checks = defs.checks + [c for c in kept_checks if c.id not in new_cids]
        before = dict(self.state.file_services)
        self.state.set_files(services, checks)
        for e in errors:
            log.error("refused config file %s", e)
        for s in services:
            if s.id not in before:
                self.out(f"    Service: {s.name} (ID {s.id}) from {s.source}")
        return errors

    async def reload(self) -> list[str]:
        errors = self.load_files()
        self.changed()
        return errors

    # -- writes to the servers ------------------------------------------------------------

    def _token(self, token: str) -> str:
        """The token of a cleanup the agent does on its own (deregistering what it
        registered): the given one, else the agent's. Registrations use their own token as
        it is (an empty one is the anonymous token), so a caller without a token never
        writes with the agent's."""
        return token or self.opts.token

    def _node_fields(self) -> dict[str, Any]:
        return {"Node": self.opts.node, "Address": self.opts.address, "SkipNodeUpdate": True}

    async def _write(self, path: str, body: dict[str, Any], token: str) -> None:
        status, value, _ = await self.servers.call("PUT", path, token=token, json_body=body)
        if status >= 300:
            raise WriteRefused(status, _message(value))

    async def register_service(
        self, sid: str, body: Mapping[str, Any], checks: Any, token: str, *, body_token: str = ""
    ) -> None:
        """Raises WriteRefused (the server's 4xx) or Unreachable. ``body_token``: the token a
        local API caller sent only in its body's ``WriteRequest`` (see ``_options``)."""
        doc = {**self._node_fields(), "Service": dict(body), "Checks": [dict(c) for c in checks]}
        doc.update(_options(body_token))
        await self._write("/v1/catalog/register", doc, token)
        self.state.synced_services.add(sid)
        self.state.synced_checks.update(str(c["CheckID"]) for c in checks)
        self.state.save_synced()

    async def deregister_service(self, sid: str, token: str, *, fallback: bool = True) -> None:
        doc = {"Node": self.opts.node, "ServiceID": sid}
        await self._write("/v1/catalog/deregister", doc, self._token(token) if fallback else token)
        self.state.synced_services.discard(sid)
        self.state.save_synced()

    async def register_check(
        self, cid: str, check: Mapping[str, Any], token: str, *, body_token: str = ""
    ) -> None:
        doc = {**self._node_fields(), "Check": dict(check), **_options(body_token)}
        await self._write("/v1/catalog/register", doc, token)
        self.state.synced_checks.add(cid)
        self.state.save_synced()

    async def deregister_check(self, cid: str, token: str, *, fallback: bool = True) -> None:
        doc = {"Node": self.opts.node, "CheckID": cid}
        await self._write("/v1/catalog/deregister", doc, self._token(token) if fallback else token)
        self.state.synced_checks.discard(cid)
        self.state.save_synced()

    async def apply(self, op: sync.Op) -> None:
        if isinstance(op, sync.RegisterService):
            await self.register_service(op.service_id, op.body, op.checks, op.token)
        elif isinstance(op, sync.RegisterCheck):
            await self.register_check(op.check_id, op.check, op.token)
        elif isinstance(op, sync.DeregisterService):
            await self.deregister_service(op.service_id, op.token)
        else:
            await self.deregister_check(op.check_id, op.token)

    # -- anti-entropy ---------------------------------------------------------------------

    def desired(self) -> tuple[dict[str, sync.Desired], dict[str, sync.DesiredCheck]]:
        svcs = {sid: sync.Desired(s.body, s.token) for sid, s in self.state.services().items()}
        checks = {
            cid: sync.DesiredCheck(body, self.state.result(cid, body), token)
            for cid, (body, token) in self.state.checks().items()
        }
        return svcs, checks

    async def catalog_view(self) -> tuple[dict[str, Any], dict[str, Any]]:
        node = quote(self.opts.node, safe="")
        status, doc, _ = await self.servers.call(
            "GET", f"/v1/catalog/node/{node}", token=self.opts.token
        )
        if status == 404 or doc is None:
            services: dict[str, Any] = {}
        elif status >= 300:
            raise WriteRefused(status, _message(doc))
        else:
            services = dict(doc.get("Services") or {})
        status, checks, _ = await self.servers.call(
            "GET", f"/v1/health/node/{node}", token=self.opts.token
        )
        if status >= 300:
            raise WriteRefused(status, _message(checks))
        return services, {str(c["CheckID"]): c for c in checks or []}

    def note_maintenance(self, catalog_checks: Mapping[str, Any]) -> None:
        """Keep the maintenance checks of the node's catalog checks (see ``maintenance``)."""
        found = {
            cid: dict(c)
            for cid, c in catalog_checks.items()
            if is_maintenance_check(cid) and isinstance(c, dict)
        }
        if found != self.maintenance:
            self.maintenance = found
            self._changed.set()
            self._changed = trio.Event()

    async def set_maintenance(self, check: Mapping[str, Any], enable: bool, token: str) -> None:
        """Add (``enable``) or remove a maintenance check in the catalog with the caller's
        token, so the servers' ACLs decide (node:write, or service:write on the service).
        Enabling again keeps the check there, reason and all, as Consul: it is written again
        as it is, which still needs the caller's permission. WriteRefused: the servers
        refused; Unreachable: none answered (the check lives in the catalog only)."""
        _, cat_checks = await self.catalog_view()
        self.note_maintenance(cat_checks)
        cid = str(check["CheckID"])
        if enable:
            body = dict(check)
            old = cat_checks.get(cid)
            if isinstance(old, dict):
                body["Notes"] = old.get("Notes", body["Notes"])
            await self._write("/v1/catalog/register", {**self._node_fields(), "Check": body}, token)
        else:
            doc = {"Node": self.opts.node, "CheckID": cid}
            await self._write("/v1/catalog/deregister", doc, token)
        _, cat_checks = await self.catalog_view()
        self.note_maintenance(cat_checks)

    async def full_sync(self) -> int:
        """One anti-entropy pass; how many writes it made. Raises Unreachable. A write the
        server refuses is logged and skipped (its service stays out of the catalog until its
        definition or token changes)."""
        cat_services, cat_checks = await self.catalog_view()
        self.note_maintenance(cat_checks)
        svcs, checks = self.desired()
        ops = sync.plan(
            svcs,
            checks,
            cat_services,
            cat_checks,
            self.state.synced_services,
            self.state.synced_checks,
        )
        for op in ops:
            try:
                await self.apply(op)
            except WriteRefused as e:
                log.error(
                    "anti-entropy: %s refused (HTTP %d): %s", _describe(op), e.status, e.message
                )
        # What the agent registered and the catalog no longer has is not "synced" any more.
        gone = self.state.synced_services - set(svcs) - set(cat_services)
        if gone:
            self.state.synced_services -= gone
            self.state.save_synced()
        self.syncs += 1
        return len(ops)

    async def _sync_loop(self) -> None:
        backoff = 0.5
        while True:
            jitter = self.opts.sync_interval * (0.75 + random.random() / 2)  # noqa: S311
            with trio.move_on_after(jitter):
                await self._sync_wanted.wait()
            self._sync_wanted = trio.Event()
            try:
                n = await self.full_sync()
                backoff = 0.5
                if n:
                    log.info("anti-entropy: %d writes", n)
            except (Unreachable, WriteRefused) as e:
                log.warning("anti-entropy failed, retrying in %.1fs: %s", backoff, e)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._sync_wanted.set()
            except Exception:
                # An answer of an unexpected shape, a full disk under the data dir: keep the
                # agent (and its API) up and try again later.
                log.exception("anti-entropy failed unexpectedly; retrying in 10s")
                await trio.sleep(10.0)
                self._sync_wanted.set()

    async def _push_loop(self) -> None:
        while True:
            await self._push_wanted.wait()
            self._push_wanted = trio.Event()
            dirty, self._dirty_checks = self._dirty_checks, set()
            _, checks = self.desired()
            for cid in sorted(dirty):
                dc = checks.get(cid)
                if dc is None:
                    continue
                sid = str(dc.body.get("ServiceID") or "")
                if sid and sid not in self.state.synced_services:
                    self.request_sync()  # its service is not there yet: the full sync writes both
                    continue
                try:
                    await self.apply(sync.check_changed(cid, dc))
                except WriteRefused as e:
                    log.error("check %s refused (HTTP %d): %s", cid, e.status, e.message)
                    self.request_sync()
                except Unreachable:
                    self.request_sync()
                except Exception:
                    log.exception("pushing check %s failed unexpectedly", cid)
                    self.request_sync()

    def serf_check(
        self, status: str = "passing", output: str = "Agent alive and reachable"
    ) -> dict[str, Any]:
        return {
            "CheckID": sync.SERF_CHECK,
            "Name": "Serf Health Status",
            "Status": status,
            "Output": output,
            "TTL": format_duration(self.opts.node_ttl),
        }

    async def heartbeat(self) -> None:
        await self._write(
            "/v1/catalog/register",
            {**self._node_fields(), "Check": self.serf_check()},
            self.opts.token,
        )

    async def _heartbeat_loop(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        period = max(0.2, min(self.opts.node_ttl / 3, 10.0))
        started = False
        while True:
            try:
                await self.heartbeat()
            except (Unreachable, WriteRefused) as e:
                log.warning("node heartbeat failed: %s", e)
            except Exception:
                log.exception("node heartbeat failed unexpectedly")
            if not started:
                started = True
                task_status.started()
            await trio.sleep(period)

    async def _watch_loop(self) -> None:
        node = quote(self.opts.node, safe="")
        index = 0
        lost = False  # no server answered the last read
        while True:
            began = trio.current_time()
            try:
                status, _, ex = await self.servers.call(
                    "GET",
                    f"/v1/catalog/node/{node}?index={index}&wait=60s",
                    token=self.opts.token,
                    timeout=80.0,
                )
            except Unreachable:
                # The next read must not block: a server restarted with an empty store may
                # hold an index below ours, and would park the read for its whole wait while
                # it lacks this node's services. A read that answers at once also tells
                # ``Servers`` the server is back (``on_recovered``: a full sync).
                index, lost = 0, True
                await trio.sleep(1.0)
                continue
            except Exception:
                log.exception("watching the node's catalog failed unexpectedly")
                await trio.sleep(5.0)
                continue
            if lost:
                # Whatever it answers, the server may not be the one that went away, or may
                # have lost what the agent wrote (a 404: not even the node): make the catalog
                # match.
                lost = False
                self.request_sync()
            if status >= 300 or ex is None:
                await trio.sleep(5.0)
                continue
            try:
                new = int(ex.header(b"x-consul-index") or 0)
            except ValueError:
                new = 0
            if new < index:
                log.info("the catalog's index went back (%d -> %d): full sync", index, new)
                self.request_sync()
                new = 0  # the next read returns at once with the current index
            elif new != index:
                if index:
                    self.request_sync()
            elif trio.current_time() - began < 1.0:
                # Answered at once with nothing new: a server that does not block. Pace the
                # watch rather than spin on it.
                await trio.sleep(1.0)
            index = new
            self.last_index = index

    async def _datacenter(self) -> None:
        try:
            status, value, _ = await self.servers.call("GET", "/v1/catalog/datacenters")
            if status == 200 and isinstance(value, list) and value:
                self.datacenter = str(value[0])
        except Unreachable:
            pass

    # -- leaving --------------------------------------------------------------------------

    async def leave(self) -> None:
        """Deregister everything this agent registered, mark the node as left, stop the
        sidecars. Best effort within a few seconds: the servers may be gone."""
        self.leaving = True
        with trio.move_on_after(10):
            await self.supervisor.stop_all()
        with trio.move_on_after(10):
            services = self.state.services()
            for sid in sorted(self.state.synced_services):
                s = services.get(sid)
                try:
                    await self.deregister_service(sid, s.token if s else "")
                except (Unreachable, WriteRefused) as e:
                    log.warning("leave: cannot deregister service %s: %s", sid, e)
            for cid in sorted(self.state.synced_checks):
                try:
                    await self.deregister_check(cid, "")
                except (Unreachable, WriteRefused):
                    pass
            try:
                await self._write(
                    "/v1/catalog/register",
                    {
                        **self._node_fields(),
                        "Check": self.serf_check("critical", "Agent left the cluster"),
                    },
                    self.opts.token,
                )
            except (Unreachable, WriteRefused) as e:
                log.warning("leave: cannot mark the node as left: %s", e)

    # -- API registrations ----------------------------------------------------------------

    async def api_register(self, svc: ServiceDef, *, body_token: str = "") -> None:
        """A service registered through the local API: written through to the catalog with
        the caller's token first, so the server's ACLs decide (WriteRefused is the caller's
        answer); kept locally and synced later if no server answers. ``body_token``: see
        ``register_service``."""
        body = svc.body
        checks = [
            sync.DesiredCheck(c, self.state.result(str(c["CheckID"]), c), svc.token)
            for c in svc.checks
        ]
        try:
            await self.register_service(
                svc.id, body, [c.catalog() for c in checks], svc.token, body_token=body_token
            )
        except Unreachable as e:
            log.warning("no server for the registration of %s, kept for later: %s", svc.id, e)
        self.state.add_service(svc)
        self.changed()

    async def api_deregister(self, sid: str, token: str) -> bool:
        services = self.state.services()
        if sid not in services:
            return False
        if sid in self.state.synced_services:
            try:
                await self.deregister_service(sid, token, fallback=False)
            except Unreachable:
                pass  # removed locally; the next full sync deregisters it
        self.state.remove_service(sid)
        self.changed()
        return True


def _options(body_token: str) -> dict[str, Any]:
    """The ``WriteRequest`` of a write-through whose caller sent its token only in the body:
    passed on, so that the server applies its rule to it as to a body sent to it directly
    (ignored with ACLs off; with ACLs on a 400 that says to send the token in X-Consul-Token,
    where Consul would run the write as anonymous)."""
    return {"WriteRequest": {"Token": body_token}} if body_token else {}


def _describe(op: sync.Op) -> str:
    if isinstance(op, sync.RegisterService):
        return f"the registration of service {op.service_id!r}"
    if isinstance(op, sync.RegisterCheck):
        return f"the registration of check {op.check_id!r}"
    if isinstance(op, sync.DeregisterService):
        return f"the deregistration of service {op.service_id!r}"
    return f"the deregistration of check {op.check_id!r}"


__all__ = ["Agent", "DefinitionError", "Options", "WriteRefused"]
