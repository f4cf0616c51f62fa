"""The agent's own endpoints (version, host, metrics, monitor, reload, tokens) and
``/v1/operator/usage`` and ``/v1/operator/autopilot/*``, answered for what Trellis is.

ACLs, as Consul's: ``agent:read`` (metrics, monitor) and ``agent:write`` (reload) are
``node:read``/``node:write`` on this server's node, as ``agent/self`` already reads them
(Trellis's rule language has no ``agent`` resource: an agent is its node); ``agent/token``
needs ``acl:write``; ``agent/host``, the usage and the autopilot reads ``operator:read``, and
the autopilot configuration write ``operator:write``. ``agent/version`` needs no token.

Autopilot is Raft's server-health manager; Trellis has no Raft. The store (SQLite, or
PostgreSQL with its own replication) is the single source of truth and every ``trellis
server`` is its own leader (``/v1/operator/raft/configuration`` lists it alone). So:

* ``GET operator/autopilot/configuration`` reports autopilot as off: every knob at its zero
  value (no dead-server cleanup, no thresholds, upgrade migration disabled), no indexes;
  ``PUT`` is a 400, as there is nothing it could configure.
* ``GET operator/autopilot/health`` and ``state`` report this server alone: healthy when the
  store answers (a store that does not is a 503 before anything is reported), a failure
  tolerance of 0 (Trellis cannot see the database's own redundancy), ``LastIndex`` the
  store's change index, ``LastTerm`` 0 and ``LastContact`` "0s" (there are no terms and no
  followers), and ``StableSince`` this process's start.

Agent tokens (``PUT /v1/agent/token/{kind}``) are kept in the data directory
(``agent-tokens.json``, mode 0600), which every worker process of the server reads, and
survive a restart as Consul's do with ``acl.enable_token_persistence``; with no data
directory (in-process tests) they stay in this process's memory. The kinds map one to one
onto the configuration's ``acl.tokens.<kind>``; which of them Trellis uses for what is the
configuration's business (README, "Agent tokens").
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request

from trellis.api import __version__, telemetry
from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, ConfigError, NotFound
from trellis.api.http import json_body, json_response, services
from trellis.api.longpoll import RERUN, client_socket
from trellis.api.settings import load_file
from trellis.api.views.catalog import check_dc

bp = Blueprint("operator", __name__)
log = logging.getLogger("trellis.agent")

#: Consul's token kinds, and their older names (Consul still accepts them).
TOKEN_KINDS = {
    "default": "default",
    "agent": "agent",
    "agent_recovery": "agent_recovery",
    "replication": "replication",
    "config_file_service_registration": "config_file_service_registration",
    "dns": "dns",
    "acl_token": "default",
    "acl_agent_token": "agent",
    "agent_master": "agent_recovery",
    "acl_agent_master_token": "agent_recovery",
    "acl_replication_token": "replication",
}

#: Consul's monitor levels; ``warn`` is Python's WARNING. ``trace`` shows what ``debug`` does.
LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "err": logging.ERROR,
    "error": logging.ERROR,
}
#: Lines a slow monitor client may fall behind by before lines are dropped (never blocking
#: the code that logs).
MONITOR_BACKLOG = 1000


def _metrics() -> telemetry.Metrics:
    return current_app.extensions["trellis.metrics"]


def _require_agent(write: bool) -> None:
    node = services().settings.node_name
    a = acl.current()
    if write:
        acl.require(a.node_write(node), "node:write (agent)")
    else:
        acl.require(a.node_read(node), "node:read (agent)")


# -- version, host ---------------------------------------------------------------------------


@bp.get("/v1/agent/version")
def version():
    return json_response(
        {
            "SHA": "",
            "BuildDate": "",
            "HumanVersion": __version__,
            "FIPS": "",
        }
    )


@bp.get("/v1/agent/host")
def host():
    acl.require_operator(write=False)
    return json_response(telemetry.host_info(time.time(), _metrics().started))


# -- metrics ---------------------------------------------------------------------------------


def gauges() -> list[tuple[str, float, dict[str, str]]]:
    """The figures computed when asked: this process's and the store's (see telemetry)."""
    s = services()
    store = s.store
    svcs = store.services()
    checks = store.checks()
    out: list[tuple[str, float, dict[str, str]]] = [
        ("blocking.waiting", float(store.feed.waiting()), {}),
        ("store.index", float(store.current_index()), {"backend": s.store_kind}),
        ("catalog.nodes", float(len(store.nodes())), {}),
        ("catalog.services", float(len({x.name for x in svcs})), {}),
        ("catalog.service_instances", float(len(svcs)), {}),
        ("session.count", float(len(store.sessions())), {}),
        ("cluster.server_processes", float(s.members.share()[1]), {}),
        ("agent.monitors", float(_monitors()), {}),
    ]
    for status in ("passing", "warning", "critical", "maintenance"):
        n = sum(1 for c in checks if c.status == status)
        out.append(("catalog.checks", float(n), {"status": status}))
    out.extend((n, v, dict(lb)) for n, v, lb in telemetry.process_gauges())
    return out


@bp.get("/v1/agent/metrics")
def metrics():
    _require_agent(write=False)
    fmt = request.args.get("format", "")
    if fmt not in ("", "prometheus"):
        raise BadRequest(f"query parameter 'format' must be 'prometheus' or absent, not {fmt!r}")
    g = gauges()
    if fmt == "prometheus":
        return Response(
            _metrics().to_prometheus(g),
            status=200,
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )
    return json_response(_metrics().to_json(g, time.time()))


def install_request_metrics(app: Any) -> None:
    """Count every request and time it, by method (Consul's ``api.http`` sample). A blocking
    query counts once, timed until it parked or answered at once."""
    app.extensions["trellis.metrics"] = telemetry.Metrics()
    pid = str(os.getpid())

    @app.before_request
    def _start() -> None:
        request.environ["trellis.started"] = time.perf_counter()

    m: telemetry.Metrics = app.extensions["trellis.metrics"]
    # Every request passes here (a hot path): the keys are built once per method and status.
    keys: dict[tuple[str, int], tuple[tuple, tuple]] = {}

    @app.after_request
    def _count(resp: Any) -> Any:
        if RERUN in request.environ:
            # A parked blocking query's re-run (trellis.api.longpoll): the request was
            # counted, and timed, when it parked.
            return resp
        k = (request.method, resp.status_code)
        pair = keys.get(k)
        if pair is None:
            labels = (("method", k[0]), ("worker_pid", pid))
            counter = (("code", str(k[1])), *labels)
            pair = keys[k] = (("http.requests", counter), ("api.http", labels))
        m.count_key(pair[0])
        t0 = request.environ.get("trellis.started")
        if t0 is not None:
            m.sample_key(pair[1], (time.perf_counter() - t0) * 1000.0)
        return resp


# -- monitor ---------------------------------------------------------------------------------


class _Tap(logging.Handler):
    """Copies log records to one monitor client's queue; drops them when it falls behind."""

    def __init__(self, level: int, as_json: bool) -> None:
        super().__init__(level)
        self.lines: queue.Queue[str] = queue.Queue(MONITOR_BACKLOG)
        self.as_json = as_json
        self.dropped = 0

    def line_for(self, record: logging.LogRecord) -> str:
        """One record as Consul's monitor prints it: text, or one JSON object (logjson)."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        level = {"WARNING": "WARN"}.get(record.levelname, record.levelname)
        msg = record.getMessage()
        if self.as_json:
            return json.dumps(
                {"@level": level.lower(), "@message": msg, "@module": record.name, "@timestamp": ts}
            )
        return f"{ts} [{level}]  {record.name}: {msg}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put_nowait(self.line_for(record) + "\n")
        except queue.Full:
            self.dropped += 1
        except Exception:  # a bad log call must not break the code that logged
            self.handleError(record)


def _own_line(tap: _Tap, level: int, msg: str) -> bytes:
    """A line of the monitor's own (whatever the level asked), in the stream's format."""
    record = logging.LogRecord(log.name, level, __file__, 0, msg, None, None)
    return (tap.line_for(record) + "\n").encode()


def _peer_closed(sock: Any, raw: Any) -> bool:
    """Whether the monitor's client has gone: asked of Trellis's gevent worker's socket, or
    else (the gthread worker) of the plain socket with a peek that reads nothing. With
    neither (an in-process test client) the client never goes."""
    if sock is not None:
        return bool(sock.peer_closed())
    if isinstance(raw, socket.socket):
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
    return False


_MONITORS = [0]
_MONITORS_LOCK = threading.Lock()


def _monitors(delta: int = 0) -> int:
    """How many monitor streams this process is serving (after adding ``delta``)."""
    with _MONITORS_LOCK:
        _MONITORS[0] += delta
        return _MONITORS[0]


@bp.get("/v1/agent/monitor")
def monitor():
    """Stream this process's log lines at ``loglevel`` and above as they are logged, until
    the client goes. A bad ``loglevel`` is the caller's (400)."""
    _require_agent(write=False)
    name = (request.args.get("loglevel") or "info").strip().lower()
    if name not in LEVELS:
        raise BadRequest(f"Unknown log level: {name}")
    as_json = request.args.get("logjson") is not None
    tap = _Tap(LEVELS[name], as_json)
    sock = client_socket(request.environ)
    raw = request.environ.get("gunicorn.socket")
    root = logging.getLogger()
    root.addHandler(tap)
    _monitors(+1)

    def stream() -> Iterator[bytes]:
        try:
            # Something to start the chunked body with, so the client knows it is streaming.
            yield _own_line(tap, logging.INFO, f"monitor started at level {name}")
            while True:
                try:
                    line = tap.lines.get(timeout=1.0)
                except queue.Empty:
                    if _peer_closed(sock, raw):
                        return
                    continue
                if tap.dropped:
                    n, tap.dropped = tap.dropped, 0
                    yield _own_line(
                        tap, logging.WARNING, f"monitor dropped {n} lines (slow client)"
                    )
                yield line.encode("utf-8", "replace")
        finally:
            root.removeHandler(tap)
            _monitors(-1)

    return Response(
        stream(),
        status=200,
        content_type="text/plain; charset=utf-8",
        headers={"X-Accel-Buffering": "no"},
    )


# -- reload ----------------------------------------------------------------------------------


@bp.put("/v1/agent/reload")
def reload():
    """Re-read the server's config file and apply what can change while running: the log
    level (of this worker process). Other changed settings need a restart, and are logged
    as such. A config file that no longer reads is the operator's to fix: a 400 saying why,
    and nothing changes."""
    _require_agent(write=True)
    s = services().settings
    if not s.config_file:
        log.info("reload requested; this server was started without a config file")
        return json_response(None)
    try:
        values = load_file(s.config_file)
    except ConfigError as e:
        raise BadRequest(f"reload refused: {e}") from None
    level = str(values.get("log_level", s.log_level)).upper()
    if level == "WARN":
        level = "WARNING"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "TRACE"):
        raise BadRequest(f"reload refused: log_level {level.lower()!r} is not a log level")
    logging.getLogger().setLevel("DEBUG" if level == "TRACE" else level)
    restart = sorted(k for k, v in values.items() if k != "log_level" and getattr(s, k, v) != v)
    log.info("reloaded %s: log level %s", s.config_file, level.lower())
    log.debug("reload: now logging at %s", level.lower())
    if restart:
        log.warning("reload: these settings change only on a restart: %s", restart)
    return json_response(None)


# -- tokens ----------------------------------------------------------------------------------

_MEMORY_TOKENS: dict[str, str] = {}
_TOKENS_LOCK = threading.Lock()


def _tokens_path() -> str | None:
    d = services().settings.data_dir
    return os.path.join(d, "agent-tokens.json") if d else None


def agent_tokens() -> dict[str, str]:
    """The tokens set through ``agent/token/{kind}`` (kind -> secret)."""
    path = _tokens_path()
    if path is None:
        return dict(_MEMORY_TOKENS)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


@bp.put("/v1/agent/token/<kind>")
def set_token(kind: str):
    acl.require(acl.current().acl_write(), "acl:write")
    canonical = TOKEN_KINDS.get(kind)
    if canonical is None:
        raise NotFound(f'Token "{kind}" is unknown')
    body = json_body()
    if not isinstance(body, dict) or not isinstance(body.get("Token", ""), str):
        raise BadRequest("the body must be an object with a string 'Token'")
    secret = body.get("Token", "")
    path = _tokens_path()
    with _TOKENS_LOCK:
        if path is None:
            _MEMORY_TOKENS[canonical] = secret
        else:
            tokens = agent_tokens()
            tokens[canonical] = secret
            _write_private(path, json.dumps(tokens, sort_keys=True))
    log.info("updated agent token %r", canonical)
    return json_response(None)


def _write_private(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` at once (rename), readable by this user only."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".agent-tokens.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- operator --------------------------------------------------------------------------------

_GATEWAYS = ("ingress-gateway", "mesh-gateway", "terminating-gateway")


@bp.get("/v1/operator/usage")
def usage():
    check_dc()
    acl.require_operator(write=False)
    s = services()
    store = s.store
    index = store.current_index()
    svcs = store.services()
    connect = {k: 0 for k in ("connect-native", "connect-proxy", *_GATEWAYS)}
    for x in svcs:
        if x.kind in connect:
            connect[x.kind] += 1
        elif x.connect and x.connect.get("Native"):
            connect["connect-native"] += 1
    # Consul bills neither proxies and gateways nor its own "consul" service.
    billable = sum(
        1 for x in svcs if x.kind not in ("connect-proxy", *_GATEWAYS) and x.name != "consul"
    )
    dc = s.settings.datacenter
    body = {
        "Usage": {
            dc: {
                "Services": len({x.name for x in svcs}),
                "ServiceInstances": len(svcs),
                "ConnectServiceInstances": connect,
                "BillableServiceInstances": billable,
                "Nodes": len(store.nodes()),
            }
        },
        "Index": index,
        "LastContact": 0,
        "KnownLeader": True,
        "ConsistencyLevel": "leader",
        "NotModified": False,
        "Backend": 0,
        "ResultsFilteredByACLs": False,
    }
    return json_response(body, index=index)


@bp.get("/v1/operator/autopilot/configuration")
def autopilot_configuration():
    check_dc()
    acl.require_operator(write=False)
    return json_response(
        {
            "CleanupDeadServers": False,
            "LastContactThreshold": "0s",
            "MaxTrailingLogs": 0,
            "MinQuorum": 0,
            "ServerStabilizationTime": "0s",
            "RedundancyZoneTag": "",
            "DisableUpgradeMigration": True,
            "UpgradeVersionTag": "",
            "CreateIndex": 0,
            "ModifyIndex": 0,
        }
    )


@bp.put("/v1/operator/autopilot/configuration")
def autopilot_set_configuration():
    check_dc()
    acl.require_operator(write=True)
    raise BadRequest(
        "Trellis has no Raft, so no autopilot to configure: each server is its own leader"
        " over the shared store (README, 'Operator endpoints')"
    )


def _server_health() -> dict[str, Any]:
    from trellis.api.views.status import _addr

    s = services()
    node = s.store.node(s.settings.node_name)
    started = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(current_app.extensions["trellis.metrics"].started)
    )
    return {
        "ID": (node.id if node else "") or s.settings.node_name,
        "Name": s.settings.node_name,
        "Address": _addr(),
        "SerfStatus": "alive",
        "Version": __version__,
        "Leader": True,
        "LastContact": "0s",
        "LastTerm": 0,
        "LastIndex": s.store.current_index(),
        "Healthy": True,
        "Voter": True,
        "StableSince": started,
    }


@bp.get("/v1/operator/autopilot/health")
def autopilot_health():
    check_dc()
    acl.require_operator(write=False)
    server = _server_health()
    return json_response({"Healthy": True, "FailureTolerance": 0, "Servers": [server]})


@bp.get("/v1/operator/autopilot/state")
def autopilot_state():
    check_dc()
    acl.require_operator(write=False)
    h = _server_health()
    server = {
        "ID": h["ID"],
        "Name": h["Name"],
        "Address": h["Address"],
        "NodeStatus": "alive",
        "Version": h["Version"],
        "LastContact": h["LastContact"],
        "LastTerm": 0,
        "LastIndex": h["LastIndex"],
        "Healthy": True,
        "StableSince": h["StableSince"],
        "Status": "leader",
        "Meta": {},
        "NodeType": "voter",
    }
    return json_response(
        {
            "Healthy": True,
            "FailureTolerance": 0,
            "OptimisticFailureTolerance": 0,
            "Servers": {h["ID"]: server},
            "Leader": h["ID"],
            "Voters": [h["ID"]],
        }
    )
