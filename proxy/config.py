"""What a proxy is configured to do, from its service registration or from flags. Pure.

A sidecar's configuration lives in the catalog, as Consul keeps it: the ``connect-proxy``
service registered for the app (``connect.sidecar_service``, or a proxy registered with
``Kind: connect-proxy`` by hand) carries the public address and port, the local app's address
and port and the upstreams; an app registered with the one-line ``connect.proxy`` form carries
the same in ``Connect.Proxy.Config`` (Consul 1.2's managed-proxy keys). ``from_proxy_service``
and ``from_managed`` read both forms, in either spelling (the API's PascalCase, the config
file's snake_case, which ``Config`` keeps as written since it is opaque to the catalog).
``ConfigError`` says what is wrong with a registration; the operator who wrote it is at fault.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Consul's built-in proxy's default for an upstream's connect timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_BIND_ADDRESS = "127.0.0.1"


class ConfigError(ValueError):
    """A proxy registration or flag that cannot be served. The operator is at fault."""


@dataclass(frozen=True)
class Upstream:
    """A local listener that reaches one destination service over Connect."""

    destination: str
    bind_port: int
    bind_address: str = DEFAULT_BIND_ADDRESS
    datacenter: str = ""  # "" = this proxy's datacenter
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @property
    def listen(self) -> tuple[str, int]:
        return (self.bind_address, self.bind_port)

    def label(self) -> str:
        return f"{self.destination} => {_hostport(self.bind_address, self.bind_port, short=True)}"


@dataclass(frozen=True)
class ProxyConfig:
    """Everything a proxy listens on and forwards to.

    ``service`` is the identity the proxy acts as (the app's service name for a sidecar, the
    ``-service`` name for a developer proxy). ``public`` is None when there is no public
    listener (a developer proxy without ``-listen``). ``local_app`` is where admitted
    connections go.
    """

    service: str
    proxy_id: str = ""
    public: tuple[str, int] | None = None
    local_app: tuple[str, int] | None = None
    upstreams: tuple[Upstream, ...] = ()

    def describe(self) -> list[tuple[str, str]]:
        """The banner's lines (``trellis connect proxy`` prints them at start)."""
        lines = [("Service", self.service)]
        lines += [("Upstream", u.label()) for u in self.upstreams]
        if self.public is None:
            lines.append(("Public listener", "Disabled"))
        else:
            app = _hostport(*self.local_app) if self.local_app else "none"
            lines.append(("Public listener", f"{_hostport(*self.public)} => {app}"))
        return lines


def _hostport(host: str, port: int, *, short: bool = False) -> str:
    if short and host == DEFAULT_BIND_ADDRESS:
        return f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _get(d: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``d`` (PascalCase or snake_case spellings)."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return None


def _port(value: Any, what: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        else:
            raise ConfigError(f"{what} must be a port number, not {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"{what} must be between {low} and 65535, not {value}")
    return int(value)


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be an IP address")
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ConfigError(f"{what} must be an IP address, not {value!r}") from None


def _timeout_ms(value: Any, what: str) -> float:
    if value is None:
        return DEFAULT_CONNECT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 600000:
        raise ConfigError(f"{what} must be a number of milliseconds from 1 to 600000")
    return float(value) / 1000.0


def parse_upstream(raw: Any, where: str) -> Upstream:
    """One upstream, from a registration (either spelling)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object")
    kind = _get(raw, "DestinationType", "destination_type") or "service"
    if kind != "service":
        raise ConfigError(f"{where}: only destination_type 'service' is supported, not {kind!r}")
    name = _get(raw, "DestinationName", "destination_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: destination_name is required")
    port = _get(raw, "LocalBindPort", "local_bind_port")
    if port is None:
        raise ConfigError(f"{where}: local_bind_port is required")
    address = _get(raw, "LocalBindAddress", "local_bind_address") or DEFAULT_BIND_ADDRESS
    dc = _get(raw, "Datacenter", "datacenter") or ""
    if not isinstance(dc, str):
        raise ConfigError(f"{where}: datacenter must be a string")
    cfg = _get(raw, "Config", "config") or {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: config must be an object")
    return Upstream(
        destination=name,
        bind_port=_port(port, f"{where}: local_bind_port"),
        bind_address=_address(address, f"{where}: local_bind_address"),
        datacenter=dc,
        connect_timeout=_timeout_ms(cfg.get("connect_timeout_ms"), f"{where}: connect_timeout_ms"),
    )


def _upstreams(proxy: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Upstream, ...]:
    raw: list[tuple[Any, str]] = []
    for i, u in enumerate(_get(proxy, "Upstreams", "upstreams") or ()):
        raw.append((u, f"upstream {i + 1}"))
    # Consul 1.2 kept upstreams in the proxy's opaque config; still accepted there.
    for i, u in enumerate(config.get("upstreams") or ()):
        raw.append((u, f"config upstream {i + 1}"))
    ups = tuple(parse_upstream(u, where) for u, where in raw)
    seen: dict[tuple[str, int], str] = {}
    for u in ups:
        if u.listen in seen:
            raise ConfigError(
                f"upstreams {seen[u.listen]!r} and {u.destination!r} both listen on"
                f" {_hostport(*u.listen)}"
            )
        seen[u.listen] = u.destination
    return ups


def from_proxy_service(svc: Mapping[str, Any]) -> ProxyConfig:
    """From a ``connect-proxy`` service as ``/v1/agent/service/<id>`` returns it."""
    if svc.get("Kind") != "connect-proxy":
        raise ConfigError(f"service {svc.get('ID')!r} is not a connect-proxy")
    proxy = svc.get("Proxy") or {}
    if not isinstance(proxy, Mapping):
        raise ConfigError("the proxy registration's Proxy must be an object")
    dest = proxy.get("DestinationServiceName")
    if not isinstance(dest, str) or not dest:
        raise ConfigError("the proxy registration names no DestinationServiceName")
    config = proxy.get("Config") or {}
    if not isinstance(config, Mapping):
        raise ConfigError("the proxy registration's Proxy.Config must be an object")
    bind_address = config.get("bind_address") or svc.get("Address") or "0.0.0.0"  # noqa: S104
    bind_port = config.get("bind_port") or svc.get("Port")
    if not bind_port:
        raise ConfigError("the proxy registration has no Port (nor Config.bind_port)")
    local_address = proxy.get("LocalServiceAddress") or "127.0.0.1"
    local_port = proxy.get("LocalServicePort")
    local = config.get("local_service_address")
    if isinstance(local, str) and local:
        local_address, _, p = local.rpartition(":")
        local_port = p
    if not local_port:
        raise ConfigError("the proxy registration has no LocalServicePort")
    return ProxyConfig(
        service=dest,
        proxy_id=str(svc.get("ID") or ""),
        public=(
            _address(bind_address, "bind_address"),
            _port(bind_port, "the public listener's port"),
        ),
        local_app=(
            _address(local_address, "local_service_address"),
            _port(local_port, "the local service port"),
        ),
        upstreams=_upstreams(proxy, config),
    )


def from_managed(svc: Mapping[str, Any]) -> ProxyConfig:
    """From an app registered with the one-line ``connect.proxy`` form (Consul 1.2's managed
    proxy): the proxy's settings are in the app's ``Connect.Proxy.Config``."""
    connect = svc.get("Connect") or {}
    proxy = connect.get("Proxy") if isinstance(connect, Mapping) else None
    if not isinstance(proxy, Mapping):
        raise ConfigError(f"service {svc.get('ID')!r} has no Connect.Proxy and no sidecar")
    config = proxy.get("Config") or {}
    if not isinstance(config, Mapping):
        raise ConfigError("Connect.Proxy.Config must be an object")
    name = svc.get("Service")
    if not isinstance(name, str) or not name:
        raise ConfigError("the service registration has no name")
    bind_port = config.get("bind_port")
    if not bind_port:
        raise ConfigError(
            f"service {name!r}: Connect.Proxy.Config.bind_port is required to run its"
            " proxy (the node agent allocates one; without it, set it in the registration)"
        )
    local = config.get("local_service_address")
    local_port: Any
    if isinstance(local, str) and local:
        local_address, _, local_port = local.rpartition(":")
    else:
        local_address, local_port = "127.0.0.1", svc.get("Port")
    if not local_port:
        raise ConfigError(f"service {name!r} has no Port to forward to")
    return ProxyConfig(
        service=name,
        proxy_id=f"{svc.get('ID') or name}-proxy",
        public=(
            _address(config.get("bind_address") or "0.0.0.0", "bind_address"),  # noqa: S104
            _port(bind_port, "bind_port"),
        ),
        local_app=(
            _address(local_address, "local_service_address"),
            _port(local_port, "the local service port"),
        ),
        upstreams=_upstreams({}, config),
    )


#: Consul's port range for ``connect.sidecar_service`` proxies registered without a port.
SIDECAR_MIN_PORT, SIDECAR_MAX_PORT = 21000, 21255


def sidecar_registration(
    spec: Mapping[str, Any],
    *,
    parent_id: str,
    parent_name: str,
    parent_port: int,
    parent_address: str = "",
    tags: Sequence[str] = (),
    meta: Mapping[str, str] | None = None,
    taken_ports: Sequence[int] | set[int] = (),
) -> dict[str, Any]:
    """The connect-proxy registration of ``connect.sidecar_service`` (``spec``, PascalCase),
    with Consul's defaults: ID ``<id>-sidecar-proxy``, the first port of 21000-21255 not in
    ``taken_ports``, the parent's tags, meta and address, and a TCP check of the port plus an
    alias of the parent. The one place both the server's agent endpoints and the node agent
    take them from. ``ConfigError`` when no port is left."""
    body = dict(spec)
    body.setdefault("ID", f"{parent_id}-sidecar-proxy")
    body.setdefault("Name", f"{parent_name}-sidecar-proxy")
    body["Kind"] = "connect-proxy"
    if not body.get("Port"):
        taken = set(taken_ports)
        free = [p for p in range(SIDECAR_MIN_PORT, SIDECAR_MAX_PORT + 1) if p not in taken]
        if not free:
            raise ConfigError("no free sidecar port left in 21000-21255 on this node")
        body["Port"] = free[0]
    body.setdefault("Tags", list(tags))
    body.setdefault("Meta", dict(meta or {}))
    if parent_address and "Address" not in body:
        body["Address"] = parent_address
    proxy = dict(body.get("Proxy") or {})
    proxy["DestinationServiceName"] = parent_name
    proxy["DestinationServiceID"] = parent_id
    proxy.setdefault("LocalServiceAddress", "127.0.0.1")
    proxy.setdefault("LocalServicePort", parent_port)
    body["Proxy"] = proxy
    if not body.get("Check") and not body.get("Checks"):
        addr = body.get("Address") or "127.0.0.1"
        body["Checks"] = [
            {
                "Name": "Connect Sidecar Listening",
                "TCP": f"{addr}:{body['Port']}",
                "Interval": "10s",
            },
            {"Name": f"Connect Sidecar Aliasing {parent_id}", "AliasService": parent_id},
        ]
    return body


def parse_upstream_flag(text: str) -> Upstream:
    """``-upstream DEST:PORT`` or ``DEST:ADDR:PORT`` (the developer proxy)."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise ConfigError(f"-upstream {text!r}: expected DEST:PORT (e.g. postgresql:9191)")
    address, _, port = rest.rpartition(":")
    return Upstream(
        destination=name,
        bind_port=_port(port, f"-upstream {text!r}: the port"),
        bind_address=_address(address, f"-upstream {text!r}: the address")
        if address
        else DEFAULT_BIND_ADDRESS,
    )


def parse_listen(text: str) -> tuple[str, int]:
    """``-listen ADDR:PORT``."""
    address, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"-listen {text!r}: expected ADDR:PORT")
    return (_address(address or "0.0.0.0", "-listen address"), _port(port, "-listen port"))  # noqa: S104


def from_flags(
    service: str,
    upstreams: Sequence[str],
    *,
    listen: str | None = None,
    service_addr: str | None = None,
) -> ProxyConfig:
    """The developer proxy: ``-service NAME -upstream DEST:PORT [-listen ADDR:PORT
    -service-addr ADDR:PORT]``."""
    ups = tuple(parse_upstream_flag(u) for u in upstreams)
    _upstreams({"Upstreams": [_as_raw(u) for u in ups]}, {})  # the duplicate-listener check
    public = parse_listen(listen) if listen else None
    local = parse_listen(service_addr) if service_addr else None
    if public is not None and local is None:
        raise ConfigError("-listen needs -service-addr (where accepted connections go)")
    if local is not None and public is None:
        raise ConfigError("-service-addr needs -listen")
    return ProxyConfig(service=service, public=public, local_app=local, upstreams=ups)


def _as_raw(u: Upstream) -> dict[str, Any]:
    return {
        "DestinationName": u.destination,
        "LocalBindPort": u.bind_port,
        "LocalBindAddress": u.bind_address,
    }
