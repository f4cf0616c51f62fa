"""Managed sidecars: the ``connect-proxy`` registration the node agent writes for an app
registered with the one-line ``connect.proxy`` form, the argv that runs it, and its port.

An app that says ``"connect": {"proxy": {}}`` (Consul 1.2's managed proxy) asks the agent to
register and run its sidecar. ``registration`` turns the app's definition, in either spelling
(the API's PascalCase, the config file's snake_case; ``Config`` is opaque and keeps its keys
as written) and the public port the agent gave it into the body of a ``connect-proxy``
service with Consul's ``sidecar_service`` defaults: ID ``<app-id>-sidecar-proxy``, the app's
tags, meta and address, a TCP check on the public port and an alias check on the app. The
sidecar then runs as ``trellis connect proxy -proxy-id <ID>`` and reads that registration
(``trellis.proxy.config.from_proxy_service``) like any other.

``PortAllocator`` hands out public ports from ``ports.proxy_min_port``..``proxy_max_port``.
A proxy keeps its port for as long as it exists, across reloads and agent restarts (the
agent passes the previous assignment back in, from its data dir): clients and firewall rules
see one port per sidecar. Everything here is pure except ``port_is_free``, the one probe that
binds a socket, which the allocator takes as a parameter so that tests can inject their own.

Errors are ``ConfigError`` (the operator wrote a registration that cannot be served, or gave
the agent a port range too small for its sidecars).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trellis.proxy.agent.ports import SidecarSpec
from trellis.proxy.config import (
    ConfigError,
    _get,
    _port,
    from_proxy_service,
    parse_upstream,
)
from trellis.proxy.config import _address as _ip

PROXY_MIN_PORT = 20000
PROXY_MAX_PORT = 20255
#: The keys of the one-line form's ``Config`` that become fields of the registration (the
#: rest is passed through in ``Proxy.Config``, opaque).
_LIFTED = ("upstreams", "bind_port", "local_service_address")


def _managed_block(app: Mapping[str, Any]) -> Mapping[str, Any] | None:
    connect = _get(app, "Connect", "connect")
    if not isinstance(connect, Mapping):
        return None
    proxy = _get(connect, "Proxy", "proxy")
    return proxy if isinstance(proxy, Mapping) else None


def is_managed(app: Mapping[str, Any]) -> bool:
    """Whether ``app`` asks the agent to run its sidecar (the one-line ``connect.proxy``)."""
    return _managed_block(app) is not None


def app_id(app: Mapping[str, Any]) -> str:
    """The app's service ID (its name when it has no ID, as the catalog does)."""
    sid = _get(app, "ID", "id") or _get(app, "Name", "name", "Service", "service")
    if not isinstance(sid, str) or not sid:
        raise ConfigError("the service registration has no name")
    return sid


def proxy_id(app: Mapping[str, Any]) -> str:
    """The ID of the ``connect-proxy`` service the agent registers for ``app``."""
    return f"{app_id(app)}-sidecar-proxy"


def _config(app: Mapping[str, Any]) -> Mapping[str, Any]:
    block = _managed_block(app)
    if block is None:
        raise ConfigError(f"service {app_id(app)!r} has no connect.proxy block")
    config = _get(block, "Config", "config")
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"service {app_id(app)!r}: connect.proxy.config must be an object")
    return config


def fixed_port(app: Mapping[str, Any]) -> int | None:
    """The public port the app's ``connect.proxy.config.bind_port`` sets, if any: then the
    agent allocates none."""
    port = _config(app).get("bind_port")
    if port is None:
        return None
    return _port(port, f"service {app_id(app)!r}: bind_port")


def bind_address(app: Mapping[str, Any]) -> str:
    """The address the sidecar's public listener binds: ``config.bind_address``, else the
    app's address, else every address (``0.0.0.0``, as ``from_proxy_service`` reads it)."""
    addr = _config(app).get("bind_address") or _get(app, "Address", "address") or "0.0.0.0"  # noqa: S104
    return _ip(
        addr,
        f"service {app_id(app)!r}: the address its sidecar listens on"
        " (connect.proxy.config.bind_address, else the service's address)",
    )


def registration(app: Mapping[str, Any], port: int) -> dict[str, Any]:
    """The ``connect-proxy`` registration (API spelling) for ``app``, public on ``port``
    (or on ``config.bind_port`` when the app sets one)."""
    sid = app_id(app)
    name = _get(app, "Name", "name", "Service", "service") or sid
    config = _config(app)
    block = _managed_block(app)
    assert block is not None
    where = f"service {sid!r}"
    public = fixed_port(app) or _port(port, f"{where}: the public port")
    local = config.get("local_service_address")
    if isinstance(local, str) and local:
        local_addr, _, local_port = local.rpartition(":")
        local_addr = _ip(local_addr or "127.0.0.1", f"{where}: local_service_address")
    else:
        local_addr, local_port = "127.0.0.1", _get(app, "Port", "port")
    if not local_port:
        raise ConfigError(f"{where} has no port for its sidecar to forward to")
    upstreams = [
        (u, f"{where}: upstream {i + 1}")
        for i, u in enumerate(_get(block, "Upstreams", "upstreams") or ())
    ] + [
        (u, f"{where}: config upstream {i + 1}")
        for i, u in enumerate(config.get("upstreams") or ())
    ]
    proxy: dict[str, Any] = {
        "DestinationServiceName": name,
        "DestinationServiceID": sid,
        "LocalServiceAddress": local_addr,
        "LocalServicePort": _port(local_port, f"{where}: the local service port"),
        "Upstreams": [_upstream(raw, what) for raw, what in upstreams],
    }
    passed = {k: v for k, v in config.items() if k not in _LIFTED}
    if passed:
        proxy["Config"] = passed
    body: dict[str, Any] = {
        "ID": f"{sid}-sidecar-proxy",
        "Name": f"{name}-sidecar-proxy",
        "Kind": "connect-proxy",
        "Port": public,
        "Tags": list(_get(app, "Tags", "tags") or ()),
        "Meta": dict(_get(app, "Meta", "meta") or {}),
        "Proxy": proxy,
    }
    address = _get(app, "Address", "address")
    if address:
        body["Address"] = address
    # Consul's sidecar_service defaults: the listener accepts, and the app behind it is
    # healthy. A specific bind address is where the listener is; a wildcard one is reached
    # on loopback.
    listen = bind_address(app)
    if ipaddress.ip_address(listen).is_unspecified:
        listen = "::1" if ":" in listen else "127.0.0.1"
    body["Checks"] = [
        {
            "Name": "Connect Sidecar Listening",
            "TCP": f"[{listen}]:{public}" if ":" in listen else f"{listen}:{public}",
            "Interval": "10s",
        },
        {"Name": f"Connect Sidecar Aliasing {sid}", "AliasService": sid},
    ]
    # The sidecar reads it back with this very function: refuse here what it would refuse
    # at its start (two upstreams on one local port, say), with the app's name on it.
    try:
        from_proxy_service({**body, "Proxy": {**proxy, "Config": passed}})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return body


def _upstream(raw: Any, where: str) -> dict[str, Any]:
    """One upstream in the API spelling, checked as the sidecar will read it."""
    u = parse_upstream(raw, where)
    out: dict[str, Any] = {
        "DestinationType": "service",
        "DestinationName": u.destination,
        "LocalBindAddress": u.bind_address,
        "LocalBindPort": u.bind_port,
    }
    if u.datacenter:
        out["Datacenter"] = u.datacenter
    cfg = _get(raw, "Config", "config")
    if cfg:
        out["Config"] = dict(cfg)
    return out


def sidecar_spec(
    registration: Mapping[str, Any],
    *,
    http_addr: str,
    token: str | None = None,
    ca_file: str | None = None,
) -> SidecarSpec:
    """What the supervisor runs for ``registration``: ``trellis connect proxy -proxy-id ID``
    against the agent's own HTTP API. The token goes in the environment (``ps`` shows argv
    to every user of the node)."""
    args = ["connect", "proxy", "-proxy-id", registration["ID"], "-http-addr", http_addr]
    if ca_file:
        args += ["-ca-file", ca_file]
    return SidecarSpec(
        proxy_id=registration["ID"],
        service_id=registration["Proxy"]["DestinationServiceID"],
        args=tuple(args),
        env={"TRELLIS_HTTP_TOKEN": token} if token else {},
    )


# -- public ports ---------------------------------------------------------------------------


def port_is_free(address: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``address`` now (the allocator's one probe)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the sidecar's listener will: SO_REUSEADDR, so a port held only by closed
        # connections in TIME_WAIT (a sidecar that just restarted) counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if e.errno == errno.EADDRNOTAVAIL:
                return True  # not an address of this node: only the other probe counts
            raise
    return True


class PortAllocator:
    """Public ports for managed sidecars, one per proxy ID, from ``low``..``high``.

    ``previous`` is the assignment from before (the agent's data dir): a proxy ID in it keeps
    its port, without a probe, because its own sidecar may be holding it right now (a reload,
    or one still draining after an agent restart); if a stranger holds it, the sidecar says
    so in its bind error. A new proxy ID gets the lowest port in the range that no other
    proxy has and that ``is_free`` says can be bound both on 127.0.0.1 and on the sidecar's
    bind address.
    """

    def __init__(
        self,
        low: int = PROXY_MIN_PORT,
        high: int = PROXY_MAX_PORT,
        *,
        previous: Mapping[str, int] | None = None,
        is_free: Callable[[str, int], bool] = port_is_free,
    ) -> None:
        if not 1 <= low <= high <= 65535:
            raise ConfigError(
                f"the sidecar port range {low}-{high} is not valid: ports.proxy_min_port"
                " must be at least 1 and at most ports.proxy_max_port (at most 65535)"
            )
        self.low, self.high = low, high
        self._is_free = is_free
        self._given: dict[str, int] = {
            pid: port for pid, port in (previous or {}).items() if low <= port <= high
        }

    def assign(self, proxy_id: str, bind_address: str = "127.0.0.1") -> int:
        """The port of ``proxy_id``: the one it has, or a new one. ``ConfigError`` when the
        range has no free port left (the operator must widen it)."""
        if proxy_id in self._given:
            return self._given[proxy_id]
        taken = set(self._given.values())
        probes = _probe_addresses(bind_address)
        for port in range(self.low, self.high + 1):
            if port in taken:
                continue
            if all(self._is_free(a, port) for a in probes):
                self._given[proxy_id] = port
                return port
        raise ConfigError(
            f"no free port left for sidecar {proxy_id!r} in {self.low}-{self.high}"
            f" ({len(taken)} given to other sidecars, the rest in use):"
            " widen ports.proxy_min_port..proxy_max_port"
        )

    def release(self, proxy_id: str) -> None:
        """``proxy_id`` is gone: its port may go to another sidecar."""
        self._given.pop(proxy_id, None)

    def retain(self, proxy_ids: Iterable[str]) -> None:
        """Keep only the ports of ``proxy_ids`` (after a reload, the sidecars that remain)."""
        keep = set(proxy_ids)
        for pid in [p for p in self._given if p not in keep]:
            del self._given[pid]

    def assigned(self) -> dict[str, int]:
        """Every proxy ID's port, for the agent to keep in its data dir."""
        return dict(self._given)


def _probe_addresses(bind_address: str) -> tuple[str, ...]:
    addr = bind_address or "127.0.0.1"
    return ("127.0.0.1",) if addr == "127.0.0.1" else ("127.0.0.1", addr)
