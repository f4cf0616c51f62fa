"""The agent's local state: what its node runs, as the agent knows it. Pure but for the data
dir's two small files, written atomically.

Services and checks come from two places. The config files (``load_files``) are re-read on
every reload and replace the previous file definitions as a whole. The local API
(``add_service``...) adds and removes one at a time; those registrations are written to
``<data-dir>/local.json`` before they are acknowledged and read back at start, so they survive
a restart of the agent. An API registration with the ID of a file's service wins over it, as
the later registration does in Consul.

``<data-dir>/proxy-ports.json`` keeps the public port of each managed sidecar (the one-line
``connect.proxy`` form), so a sidecar keeps its port across reloads and agent restarts; the
agent assigns them (``trellis.proxy.agent.managed.PortAllocator``) and ``services`` adds each
managed sidecar's connect-proxy registration once it has a port.

``<data-dir>/synced.json`` is the anti-entropy loop's memory: the IDs of the services and
checks the agent has registered in the catalog. Only those are ever deregistered, so what
someone else put on the node (a server's own ``/v1/agent`` endpoints, another tool) is left
alone.

Check results (the runner's ``on_change`` and the TTL endpoints) live in ``results``; a check
with no result yet shows its definition's initial status.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trellis.proxy.agent import managed
from trellis.proxy.agent.definitions import (
    DefinitionError,
    NodeCheck,
    ServiceDef,
    check_def,
    node_check,
    service_def,
    sidecar_service,
)
from trellis.proxy.agent.ports import CheckDef, CheckResult
from trellis.proxy.config import ConfigError

LOCAL_FILE = "local.json"
SYNCED_FILE = "synced.json"
PORTS_FILE = "proxy-ports.json"
#: The source of a managed sidecar's connect-proxy registration: ``managed:<app's ID>``.
MANAGED = "managed:"


def write_atomically(path: str, value: Any) -> None:
    """Write JSON so that a crash leaves the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    data = json.dumps(value, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class LocalState:
    data_dir: str | None = None
    enable_script_checks: bool = False
    file_services: dict[str, ServiceDef] = field(default_factory=dict)
    file_checks: dict[str, NodeCheck] = field(default_factory=dict)
    api_services: dict[str, ServiceDef] = field(default_factory=dict)
    api_checks: dict[str, NodeCheck] = field(default_factory=dict)
    results: dict[str, CheckResult] = field(default_factory=dict)
    synced_services: set[str] = field(default_factory=set)
    synced_checks: set[str] = field(default_factory=set)
    #: Managed sidecars' public ports, by proxy ID.
    proxy_ports: dict[str, int] = field(default_factory=dict)
    #: Bumped on every change to the services and checks (the local API's blocking reads).
    version: int = 0
    #: Bumped on every change to what ``services`` returns; its last answer, by that count.
    _services_gen: int = 0
    _services_memo: tuple[int, dict[str, ServiceDef]] | None = None

    # -- the data dir ---------------------------------------------------------------------

    def _path(self, name: str) -> str | None:
        return os.path.join(self.data_dir, name) if self.data_dir else None

    def load(self) -> list[str]:
        """Read back the API registrations and the synced IDs; one message per entry that
        could not be read (a corrupt file is the operator's to fix, the agent still starts)."""
        problems: list[str] = []
        path = self._path(LOCAL_FILE)
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError) as e:
                return [f"{path}: {e}"]
            for entry in doc.get("services", []):
                try:
                    s = service_def(
                        entry["definition"],
                        token=entry.get("token", ""),
                        enable_script_checks=self.enable_script_checks,
                    )
                    self.api_services[s.id] = s
                except (DefinitionError, KeyError, TypeError) as e:
                    problems.append(f"{path}: a service: {e}")
            for entry in doc.get("checks", []):
                try:
                    c = node_check(
                        entry["definition"],
                        token=entry.get("token", ""),
                        enable_script_checks=self.enable_script_checks,
                    )
                    self.api_checks[c.id] = c
                except (DefinitionError, KeyError, TypeError) as e:
                    problems.append(f"{path}: a check: {e}")
        ppath = self._path(PORTS_FILE)
        if ppath and os.path.exists(ppath):
            try:
                with open(ppath, encoding="utf-8") as f:
                    doc = json.load(f)
                self.proxy_ports = {
                    str(k): int(v) for k, v in doc.items() if isinstance(v, int) and v > 0
                }
            except (OSError, ValueError, TypeError, AttributeError) as e:
                problems.append(f"{ppath}: {e}")
        spath = self._path(SYNCED_FILE)
        if spath and os.path.exists(spath):
            try:
                with open(spath, encoding="utf-8") as f:
                    doc = json.load(f)
                self.synced_services = set(doc.get("services", []))
                self.synced_checks = set(doc.get("checks", []))
            except (OSError, ValueError, TypeError) as e:
                problems.append(f"{spath}: {e}")
        return problems

    def save_local(self) -> None:
        path = self._path(LOCAL_FILE)
        if not path:
            return
        write_atomically(
            path,
            {
                "services": [
                    {"definition": s.to_json(), "token": s.token}
                    for s in self.api_services.values()
                    if not s.source.startswith("sidecar:")
                ],
                "checks": [
                    {"definition": dict(c.body), "token": c.token} for c in self.api_checks.values()
                ],
            },
        )

    def set_proxy_ports(self, ports: Mapping[str, int]) -> None:
        """The managed sidecars' ports, persisted when they changed."""
        if dict(ports) == self.proxy_ports:
            return
        self.proxy_ports = dict(ports)
        path = self._path(PORTS_FILE)
        if path:
            write_atomically(path, self.proxy_ports)
        self.version += 1
        self._services_gen += 1

    def save_synced(self) -> None:
        path = self._path(SYNCED_FILE)
        if path:
            write_atomically(
                path,
                {"services": sorted(self.synced_services), "checks": sorted(self.synced_checks)},
            )

    # -- changes --------------------------------------------------------------------------

    def set_files(self, services: Iterable[ServiceDef], checks: Iterable[NodeCheck]) -> None:
        self.file_services = {s.id: s for s in services}
        self.file_checks = {c.id: c for c in checks}
        self.version += 1
        self._services_gen += 1

    def add_service(self, svc: ServiceDef) -> None:
        """An API registration, persisted before this returns (raises OSError if it cannot
        be: the registration is then not acknowledged)."""
        old = self.api_services.get(svc.id)
        self.api_services[svc.id] = svc
        try:
            self.save_local()
        except OSError:
            if old is None:
                del self.api_services[svc.id]
            else:
                self.api_services[svc.id] = old
            raise
        self.version += 1
        self._services_gen += 1

    def remove_service(self, service_id: str) -> bool:
        """Remove an API registration or hide a file's (until the files are re-read)."""
        found = False
        if service_id in self.api_services:
            del self.api_services[service_id]
            self.save_local()
            found = True
        if service_id in self.file_services:
            del self.file_services[service_id]
            found = True
        if found:
            self.version += 1
            self._services_gen += 1
        return found

    def add_check(self, check: NodeCheck) -> None:
        old = self.api_checks.get(check.id)
        self.api_checks[check.id] = check
        try:
            self.save_local()
        except OSError:
            if old is None:
                del self.api_checks[check.id]
            else:
                self.api_checks[check.id] = old
            raise
        self.results.pop(check.id, None)
        self.version += 1

    def remove_check(self, check_id: str) -> bool:
        found = False
        if check_id in self.api_checks:
            del self.api_checks[check_id]
            self.save_local()
            found = True
        if check_id in self.file_checks:
            del self.file_checks[check_id]
            found = True
        if found:
            self.version += 1
        return found

    def set_result(self, check_id: str, result: CheckResult) -> bool:
        """Record a check's result; whether it changed."""
        if self.results.get(check_id) == result:
            return False
        self.results[check_id] = result
        self.version += 1
        return True

    # -- views ----------------------------------------------------------------------------

    def services(self) -> dict[str, ServiceDef]:
        """Every service of the node: the files', the API's (which win on an ID clash), the
        connect-proxy services their ``connect.sidecar_service`` blocks define, and those of
        their managed sidecars (the one-line ``connect.proxy`` form) that have a port.

        Remembered until the services change: every blocking read of the local API (one per
        sidecar on the node) computes it again when anything changes, and building the
        sidecars' registrations is the costly part (a 50-sidecar node kept the agent at 100%
        of a core while its sidecars started)."""
        memo = self._services_memo
        if memo is not None and memo[0] == self._services_gen:
            return dict(memo[1])
        out = self._compute_services()
        self._services_memo = (self._services_gen, out)
        return dict(out)

    def _own(self) -> dict[str, ServiceDef]:
        """The services defined on this node: the files', and the API's, which win on an ID
        clash."""
        return {**self.file_services, **self.api_services}

    def managed_apps(self) -> list[ServiceDef]:
        """The services with the one-line ``connect.proxy`` form, by ID."""
        return sorted((s for s in self._own().values() if s.managed_proxy), key=lambda s: s.id)

    def _compute_services(self) -> dict[str, ServiceDef]:
        out = self._own()
        for app in self.managed_apps():
            reg = self.managed_registration(app)
            if reg is not None and reg.id not in out:
                out[reg.id] = reg
        parents = [s for s in out.values() if s.sidecar is not None]
        taken = {int(s.body.get("Port") or 0) for s in out.values()}
        for p in sorted(parents, key=lambda s: s.id):
            try:
                sc = sidecar_service(p, taken)
            except DefinitionError:
                continue  # no port left: the parent is registered without its sidecar
            if sc.id not in out:
                out[sc.id] = sc
                taken.add(int(sc.body.get("Port") or 0))
        return out

    def managed_registration(self, app: ServiceDef) -> ServiceDef | None:
        """The connect-proxy service of ``app``'s managed sidecar, or None while it has no
        port (or its ``connect.proxy`` block cannot be served: the agent says why when it
        assigns the port)."""
        pid = managed.proxy_id(app.body)
        try:
            port = managed.fixed_port(app.body) or self.proxy_ports.get(pid)
            if not port:
                return None
            body = managed.registration(app.body, port)
            return service_def(body, token=app.token, source=MANAGED + app.id)
        except (ConfigError, DefinitionError):
            return None

    def checks(self) -> dict[str, tuple[Mapping[str, Any], str]]:
        """Every check of the node: ``check ID -> (body, token)``, the services' checks and the
        node-level ones (whose ServiceID, if any, must name a local service)."""
        out: dict[str, tuple[Mapping[str, Any], str]] = {}
        svcs = self.services()
        for s in svcs.values():
            for body in s.checks:
                out[str(body["CheckID"])] = (body, s.token)
        for c in (*self.file_checks.values(), *self.api_checks.values()):
            sid = c.body.get("ServiceID")
            if sid and sid not in svcs:
                continue
            out[c.id] = (c.body, c.token)
        return out

    def check_defs(self) -> dict[str, CheckDef]:
        return {cid: check_def(body) for cid, (body, _) in self.checks().items()}

    def result(self, check_id: str, body: Mapping[str, Any]) -> CheckResult:
        r = self.results.get(check_id)
        if r is not None:
            return r
        return CheckResult(str(body.get("Status") or "critical"), str(body.get("Output") or ""))
