"""Configuration, read once at the edge into a frozen ``Settings``.

Sources, weakest first: defaults, the config file (JSON, or HCL when it ends in ``.hcl``),
``TRELLIS_*`` environment variables, command-line flags. Nothing below the CLI reads
``os.environ``; everything takes a ``Settings``.

The config file uses Consul's snake_case layout::

    {
      "datacenter": "dc1", "node_name": "host-1", "data_dir": "/var/lib/trellis",
      "domain": "trellis.", "bind_addr": "127.0.0.1",
      "addresses": {"http": "127.0.0.1", "dns": "127.0.0.1"},
      "ports": {"http": 8500, "dns": 8600},
      "dns_config": {"udp_answer_limit": 3, "a_record_limit": 0, "enable_truncate": false},
      "store": "postgresql://trellis@db/trellis",
      "server": {"workers": 2, "worker_class": "gevent", "worker_connections": 4096},
      "limits": {"kv_max_value_size": 524288, "http_max_body": 1048576,
                 "http_max_conns_per_client": 200, "http_header_timeout": "20s",
                 "http_body_timeout": "30s", "http_idle_timeout": "75s"},
      "blocking": {"default_wait": "5m", "max_wait": "10m", "max_per_client": 1024}
    }
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trellis.api.errors import ConfigError
from trellis.proxy.durations import DurationError, parse_duration

WORKER_CLASSES = ("gevent", "gthread", "sync")


@dataclass(frozen=True)
class Settings:
    datacenter: str = "dc1"
    node_name: str = field(default_factory=lambda: socket.gethostname())
    node_address: str = "127.0.0.1"
    data_dir: str = ""
    #: ``sqlite:///path`` or ``postgresql://...``; empty means SQLite in ``data_dir``.
    store: str = ""
    domain: str = "trellis."
    http_host: str = "127.0.0.1"
    http_port: int = 8500
    dns_host: str = "127.0.0.1"
    #: 0 picks a free port; -1 disables DNS.
    dns_port: int = 8600
    #: Consul's dns_config.udp_answer_limit: at most this many answers in a UDP reply (with
    #: or without EDNS0), which bounds what a spoofed query can make us send; TCP is not capped.
    dns_udp_answer_limit: int = 3
    #: Consul's dns_config.a_record_limit: at most this many A/AAAA answers over either
    #: transport (0: no limit).
    dns_a_record_limit: int = 0
    #: Consul's dns_config.enable_truncate: set TC on a UDP reply that the answer limit cut,
    #: so that resolvers retry over TCP for the full set.
    dns_enable_truncate: bool = False
    #: DNS over TCP, per worker: connections one client address may hold (0: no cap).
    dns_tcp_max_conns_per_client: int = 16
    #: DNS over TCP: a new connection must send its first query within this many seconds;
    #: between queries a connection may stay idle for dns_tcp_idle_timeout.
    dns_tcp_first_query_timeout: float = 2.0
    dns_tcp_idle_timeout: float = 10.0
    workers: int = 2
    worker_class: str = "gevent"
    #: Simultaneous connections per gevent worker (each parked blocking query holds one).
    worker_connections: int = 4096
    #: Threads per gthread worker.
    threads: int = 64
    kv_max_value_size: int = 512 * 1024
    http_max_body: int = 1024 * 1024
    #: gevent worker: connections one client address may hold open per worker (0: no cap).
    http_max_conns_per_client: int = 200
    #: gevent worker: a request's head (line and headers) must arrive within this many seconds
    #: of its first byte, and a new connection must send its first head within it too.
    http_header_timeout: float = 20.0
    #: gevent worker: a request's body must arrive within this many seconds of its head.
    http_body_timeout: float = 30.0
    #: How long an idle keep-alive connection waits for its next request.
    http_idle_timeout: float = 75.0
    default_wait: float = 300.0
    max_wait: float = 600.0
    #: Parked blocking queries one client address may hold per server process; past it, a new
    #: one answers at once with what it has (see trellis.api.longpoll).
    blocking_max_per_client: int = 1024
    #: How often a process looks for other processes' SQLite commits (seconds).
    sqlite_poll_interval: float = 0.01
    #: PostgreSQL: the follower's fallback poll when no NOTIFY arrives (seconds).
    pg_poll_interval: float = 1.0
    #: How often TTL checks are looked at for expiry (seconds).
    ttl_check_interval: float = 1.0
    #: Register this node (``node_name``/``node_address``) in the catalog at start.
    register_node: bool = True
    dev: bool = False
    log_level: str = "info"
    #: The config file the server was started with (``PUT /v1/agent/reload`` re-reads it);
    #: set by ``trellis server``, never read from a file or the environment.
    config_file: str = ""
    acl_enabled: bool = False
    acl_default_policy: str = "allow"
    #: Consul's acl.enable_key_list_policy: ``?keys`` needs key:list on the prefix itself.
    acl_enable_key_list_policy: bool = False
    #: acl.tokens.initial_management: the secret of the first management token, made at the
    #: store's first start with ACLs on (a UUID). A store bootstrapped already keeps its token.
    acl_initial_management_token: str = field(default="", repr=False)
    #: acl.tokens.agent: accepted so that a Consul server config loads; a server writes its own
    #: node straight to the store, so it has no use for it (``trellis agent`` reads it from
    #: its own config files: ``trellis.proxy.agent.definitions.config_agent_token``).
    acl_agent_token: str = field(default="", repr=False)
    #: acl.tokens.dns: DNS answers with this token's rights (unset: the anonymous token's).
    acl_dns_token: str = field(default="", repr=False)
    #: The CA provider and its configuration at the cluster's first start (later changes go
    #: through the API, as in Consul). PascalCase keys, as the API takes them.
    ca_provider: str = "builtin"
    ca_config: Mapping[str, Any] = field(default_factory=dict)
    #: The shortest LeafCertTTL the CA accepts, in seconds: Consul's 1h by default. Lower it
    #: (to 1s at the least) only to watch renewal happen, in a test or a demo.
    ca_min_leaf_ttl: float = 3600.0
    #: Base64 of 32 bytes: seals CA private keys and the Vault token in the store.
    ca_seal_key: str = ""
    #: Consul's ``session_ttl_min``: the shortest session TTL accepted (seconds). Lower it
    #: (to 1s at the least) only to watch sessions expire, in a test or a demo.
    session_ttl_min: float = 10.0

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return "sqlite:///" + os.path.join(os.path.abspath(self.data_dir), "trellis.db")

    @property
    def domain_fqdn(self) -> str:
        d = self.domain.strip(".").lower()
        return d + "."

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))


def _duration(name: str, v: Any) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    try:
        return parse_duration(str(v))
    except DurationError as e:
        raise ConfigError(f"{name}: {e}") from None


def _port(name: str, v: Any, *, allow_disable: bool = False) -> int:
    try:
        p = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {v!r} is not a port number") from None
    lo = -1 if allow_disable else 0
    if not lo <= p <= 65535:
        raise ConfigError(f"{name}: {p} is not a port number ({lo}..65535)")
    return p


def load_file(path: str) -> dict[str, Any]:
    """Read a config file into a flat dict of ``Settings`` field names."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.endswith(".hcl"):
            from trellis.api import hcl

            raw = hcl.loads(text)
        else:
            raw = json.loads(text)
    except Exception as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold an object")
    return flatten(raw, source=path)


_TOP = {
    "datacenter": "datacenter",
    "node_name": "node_name",
    "advertise_addr": "node_address",
    "data_dir": "data_dir",
    "store": "store",
    "domain": "domain",
    "log_level": "log_level",
    "session_ttl_min": "session_ttl_min",
}
_NESTED = {
    ("addresses", "http"): "http_host",
    ("addresses", "dns"): "dns_host",
    ("ports", "http"): "http_port",
    ("ports", "dns"): "dns_port",
    ("dns_config", "udp_answer_limit"): "dns_udp_answer_limit",
    ("dns_config", "a_record_limit"): "dns_a_record_limit",
    ("dns_config", "enable_truncate"): "dns_enable_truncate",
    ("dns_config", "tcp_max_conns_per_client"): "dns_tcp_max_conns_per_client",
    ("dns_config", "tcp_first_query_timeout"): "dns_tcp_first_query_timeout",
    ("dns_config", "tcp_idle_timeout"): "dns_tcp_idle_timeout",
    ("server", "workers"): "workers",
    ("server", "worker_class"): "worker_class",
    ("server", "worker_connections"): "worker_connections",
    ("server", "threads"): "threads",
    ("limits", "kv_max_value_size"): "kv_max_value_size",
    ("limits", "http_max_body"): "http_max_body",
    ("limits", "http_max_conns_per_client"): "http_max_conns_per_client",
    ("limits", "http_header_timeout"): "http_header_timeout",
    ("limits", "http_body_timeout"): "http_body_timeout",
    ("limits", "http_idle_timeout"): "http_idle_timeout",
    ("blocking", "default_wait"): "default_wait",
    ("blocking", "max_wait"): "max_wait",
    ("blocking", "max_per_client"): "blocking_max_per_client",
    ("acl", "enabled"): "acl_enabled",
    ("acl", "default_policy"): "acl_default_policy",
    ("acl", "enable_key_list_policy"): "acl_enable_key_list_policy",
    ("connect", "ca_provider"): "ca_provider",
    ("connect", "ca_config"): "ca_config",
    ("connect", "min_leaf_cert_ttl"): "ca_min_leaf_ttl",
    ("connect", "ca_seal_key"): "ca_seal_key",
}

#: Consul's snake_case CA settings (config files) and the API's PascalCase names.
CA_CONFIG_KEYS = {
    "leaf_cert_ttl": "LeafCertTTL",
    "intermediate_cert_ttl": "IntermediateCertTTL",
    "root_cert_ttl": "RootCertTTL",
    "private_key_type": "PrivateKeyType",
    "private_key_bits": "PrivateKeyBits",
    "csr_max_per_second": "CSRMaxPerSecond",
    "csr_max_concurrent": "CSRMaxConcurrent",
    "private_key": "PrivateKey",
    "root_cert": "RootCert",
    "address": "Address",
    "token": "Token",
    "root_pki_path": "RootPKIPath",
    "intermediate_pki_path": "IntermediatePKIPath",
    "ca_file": "CAFile",
    "ca_path": "CAPath",
    "cert_file": "CertFile",
    "key_file": "KeyFile",
    "tls_server_name": "TLSServerName",
    "tls_skip_verify": "TLSSkipVerify",
    "namespace": "Namespace",
}


#: ``acl.tokens.*`` (Consul's names; ``master`` is the old name of ``initial_management``).
_ACL_TOKENS = {
    "initial_management": "acl_initial_management_token",
    "master": "acl_initial_management_token",
    "agent": "acl_agent_token",
    "dns": "acl_dns_token",
}


def _acl_tokens(v: Any, source: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{source}: acl.tokens must be an object")
    out: dict[str, Any] = {}
    for k, secret in v.items():
        name = _ACL_TOKENS.get(k)
        if name is None:
            raise ConfigError(
                f"{source}: unknown setting acl.tokens.{k} (Trellis has"
                " initial_management, agent and dns)"
            )
        out[name] = secret
    return out


def flatten(raw: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "acl" and isinstance(v, dict) and "tokens" in v:
            v = dict(v)
            out.update(_acl_tokens(v.pop("tokens"), source))
        if k in _TOP:
            out[_TOP[k]] = v
        elif k == "bind_addr":
            out.setdefault("http_host", v)
            out.setdefault("dns_host", v)
        elif isinstance(v, dict) and any(g == k for g, _ in _NESTED):
            for sk, sv in v.items():
                name = _NESTED.get((k, sk))
                if name is None:
                    raise ConfigError(f"{source}: unknown setting {k}.{sk}")
                out[name] = sv
        else:
            raise ConfigError(f"{source}: unknown setting {k!r}")
    return out


def from_env(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("TRELLIS_DATA_DIR"):
        out["data_dir"] = env["TRELLIS_DATA_DIR"]
    if env.get("TRELLIS_STORE"):
        out["store"] = env["TRELLIS_STORE"]
    return out


def build(values: dict[str, Any]) -> Settings:
    """Make a validated ``Settings`` from a dict of field values (file, env and flags merged)."""
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return validate(Settings(**values))


def validate(s: Settings) -> Settings:
    """Check and normalise every field; raise ConfigError saying which one is wrong."""
    c: dict[str, Any] = {}
    c["http_port"] = _port("ports.http", s.http_port)
    c["dns_port"] = _port("ports.dns", s.dns_port, allow_disable=True)
    for name in ("default_wait", "max_wait"):
        c[name] = _duration(f"blocking.{name}", getattr(s, name))
    if c["default_wait"] <= 0 or c["max_wait"] <= 0 or c["default_wait"] > c["max_wait"]:
        raise ConfigError("blocking: need 0 < default_wait <= max_wait")
    for name in ("http_header_timeout", "http_body_timeout", "http_idle_timeout"):
        c[name] = _duration(f"limits.{name}", getattr(s, name))
        if not 0 < c[name] <= 3600:
            raise ConfigError(f"limits.{name}: must be more than 0s and at most 1h")
    for key, name, lo in (
        ("limits.http_max_conns_per_client", "http_max_conns_per_client", 0),
        ("dns_config.udp_answer_limit", "dns_udp_answer_limit", 1),
        ("dns_config.a_record_limit", "dns_a_record_limit", 0),
        ("dns_config.tcp_max_conns_per_client", "dns_tcp_max_conns_per_client", 0),
    ):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 1_000_000:
            extra = " (0: no limit)" if lo == 0 else ""
            raise ConfigError(
                f"{key}: must be a whole number from {lo} to 1000000{extra}, not {v!r}"
            )
    for key, name in (
        ("dns_config.tcp_first_query_timeout", "dns_tcp_first_query_timeout"),
        ("dns_config.tcp_idle_timeout", "dns_tcp_idle_timeout"),
    ):
        c[name] = _duration(key, getattr(s, name))
        if not 0 < c[name] <= 3600:
            raise ConfigError(f"{key}: must be more than 0s and at most 1h")
    if not isinstance(s.dns_enable_truncate, bool):
        raise ConfigError(
            f"dns_config.enable_truncate must be true or false, not {s.dns_enable_truncate!r}"
        )
    for name in (
        "workers",
        "worker_connections",
        "threads",
        "kv_max_value_size",
        "http_max_body",
        "blocking_max_per_client",
    ):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: must be a positive whole number, not {v!r}")
    if s.worker_class not in WORKER_CLASSES:
        raise ConfigError(
            f"server.worker_class: {s.worker_class!r} is not one of {', '.join(WORKER_CLASSES)}"
        )
    if not isinstance(s.ca_config, Mapping):
        raise ConfigError("connect.ca_config must be an object")
    c["ca_config"] = {CA_CONFIG_KEYS.get(k, k): v for k, v in s.ca_config.items()}
    c["ca_min_leaf_ttl"] = _duration("connect.min_leaf_cert_ttl", s.ca_min_leaf_ttl)
    if not 1 <= c["ca_min_leaf_ttl"] <= 3600:
        raise ConfigError("connect.min_leaf_cert_ttl: must be between 1s and 1h")
    c["session_ttl_min"] = _duration("session_ttl_min", s.session_ttl_min)
    if not 1 <= c["session_ttl_min"] <= 3600:
        raise ConfigError("session_ttl_min: must be between 1s and 1h")
    if s.acl_default_policy not in ("allow", "deny"):
        raise ConfigError("acl.default_policy must be allow or deny")
    for name, v in (
        ("acl.enabled", s.acl_enabled),
        ("acl.enable_key_list_policy", s.acl_enable_key_list_policy),
    ):
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, not {v!r}")
    for key, name in (
        ("initial_management", "acl_initial_management_token"),
        ("agent", "acl_agent_token"),
        ("dns", "acl_dns_token"),
    ):
        v = getattr(s, name)
        if not isinstance(v, str) or len(v) > 256 or v != v.strip():
            raise ConfigError(f"acl.tokens.{key} must be a token secret (a string)")
    if s.acl_initial_management_token:
        import uuid

        try:
            c["acl_initial_management_token"] = str(uuid.UUID(s.acl_initial_management_token))
        except ValueError:
            raise ConfigError("acl.tokens.initial_management must be a UUID") from None
    if not isinstance(s.domain, str) or not s.domain.strip("."):
        raise ConfigError("domain must be a DNS name such as 'trellis.'")
    if not s.datacenter or not str(s.datacenter).replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"datacenter {s.datacenter!r} must be letters, digits, - and _")
    if not s.node_name:
        raise ConfigError("node_name must not be empty")
    if not s.store and not s.data_dir:
        raise ConfigError("set data_dir (or store) so that Trellis knows where to keep its data")
    return dataclasses.replace(s, **c)
