#!/usr/bin/env python3
"""Node agent benchmark: what a node's checks and managed sidecars cost the servers and the node.

What it measures (every process fresh, bound to 127.0.0.1, started and ended by PID here):

1. **Steady checks.** ``--services`` (200) services in the agent's config dir, each with an HTTP
   check every ``--interval`` (10s) against one small HTTP app in this process. Once every check
   is passing in the server's catalog (and one more interval has passed), over ``--seconds``
   (60): the requests per second the server receives from the agent, the agent's CPU (% of one
   core) and RSS. Then the same with the app's answer changing on every probe (a timestamp in
   the body), which shows the output rate limit (an output-only change goes to the catalog at
   most every 5 minutes).
2. **Managed sidecars.** ``--sidecars`` (50) one-line ``connect.proxy`` services added to the
   config dir, then SIGHUP to the agent: the time until every sidecar's public port accepts a
   TCP connection, and until every one is passing in ``/v1/health/connect/<name>?passing``; the
   agent's and the sidecars' RSS and CPU (while starting, then idle).
3. **A shared upstream** (``--shared K``, run on its own: fresh server, relay and agent). K
   one-line services ``app-NN``, each with an upstream to ``db``, and ``db`` itself (one-line
   too), all on the one agent. Once every sidecar listens and ``db`` is passing: the blocking
   queries parked on the server right now (its ``/v1/agent/self`` ``Stats.blocking.waiting``,
   1 worker: the whole server), sampled, and the server requests from the agent over
   ``--seconds``. This is what the agent's shared reads (one roots watch per node, one watch
   per identical blocking read) save the server: run it on a commit before them for the
   comparison (docs/benchmarks.md says how).

How server requests are counted: the agent is pointed (``-server``) at a TCP relay in this
process, which forwards bytes both ways unchanged and parses the agent-to-server stream
(request line, headers, a Content-Length or chunked body) to count every HTTP request the
server receives from the agent, by method and path. Everything the agent sends reaches the
server through it: its syncs, heartbeats, watches, check updates, and the requests of its
sidecars that it forwards. This benchmark's own polling goes to the server directly and is not
counted. A blocking query (the agent's watch of its node) is counted when it is sent.

Usage::

    .venv/bin/python bench/agent.py                  # the full run (about 4 minutes)
    .venv/bin/python bench/agent.py --seconds 20     # shorter windows
    .venv/bin/python bench/agent.py --json out.json  # also write the results as JSON
    .venv/bin/python bench/agent.py --json -         # print JSON instead of the tables
    .venv/bin/python bench/agent.py --shared 10 --seconds 30   # only the shared upstream

This is not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from procs import Proc, background_before_run, cpu_by_pid
from report import fmt, machine, table, write_output

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TRELLIS = str(Path(PY).with_name("trellis"))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes together, in MiB (from /proc/<pid>/status)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class Banner(Proc):
    """A ``trellis`` process whose HTTP API URL is read from its banner."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.url = ""
        self._ready = threading.Event()

    def on_line(self, line: str) -> None:
        m = re.search(r"HTTP API: (http://\S+)", line)
        if m:
            self.url = m.group(1)
        if "Log data will now stream" in line:
            self._ready.set()

    def start(self, args: list[str], probe: str, timeout: float = 30.0) -> Banner:
        self.spawn(args, cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n" + self.output())
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n" + self.output())
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + probe, timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready:\n" + self.output())


# --------------------------------------------------------------------------------------------
# The counting relay between the agent and the server
# --------------------------------------------------------------------------------------------


class RequestCounter:
    """Parses one client-to-server byte stream into HTTP/1.1 requests and counts them.

    Only framing is parsed (the head, then a Content-Length or chunked body); the bytes
    themselves are forwarded untouched by the relay."""

    def __init__(self, record: Any) -> None:
        self.buf = b""
        self.body_left = 0
        self.chunked = False
        self.record = record

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                self.buf = self.buf[take:]
                self.body_left -= take
                if self.body_left:
                    return
            if self.chunked:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buf[:end].split(b";")[0] or b"0", 16)
                if size == 0:
                    # The last chunk: skip the (empty) trailers up to the blank line.
                    stop = self.buf.find(b"\r\n\r\n", end - 2 if end >= 2 else 0)
                    if stop < 0:
                        return
                    self.buf = self.buf[stop + 4 :]
                    self.chunked = False
                    continue
                self.buf = self.buf[end + 2 :]
                self.body_left = size + 2  # the chunk and its CRLF
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.buf = self.buf[end + 4 :]
            parts = head[0].split(" ")
            method, target = [*parts, "", ""][:2]
            self.record(method, target.split("?", 1)[0])
            for h in head[1:]:
                name, _, value = h.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.body_left = int(value.strip() or 0)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True


class Relay:
    """A TCP relay on 127.0.0.1 in front of the server, counting the requests that cross it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.events: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def record(self, method: str, path: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), method, path))

    def start(self) -> Relay:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the relay did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self._started.set()
        self.loop.run_forever()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        counter = RequestCounter(self.record)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await r.read(65536):
                    if count:
                        counter.feed(data)
                    w.write(data)
                    await w.drain()
            except (OSError, ValueError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    w.close()

        await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False))

    def window(self, t0: float, t1: float) -> Counter[str]:
        """The requests between two monotonic times, by ``METHOD path-kind``."""
        out: Counter[str] = Counter()
        with self.lock:
            for t, method, path in self.events:
                if t0 <= t < t1:
                    out[f"{method} {path_kind(path)}"] += 1
        return out

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def path_kind(path: str) -> str:
    """A path with its last, per-object segment folded, so that the counts group by endpoint."""
    for prefix in (
        "/v1/agent/check/",
        "/v1/catalog/node/",
        "/v1/catalog/service/",
        "/v1/health/service/",
        "/v1/health/connect/",
        "/v1/health/checks/",
        "/v1/agent/connect/ca/leaf/",
        "/v1/catalog/node-services/",
    ):
        if path.startswith(prefix):
            return prefix + "*"
    return path


# --------------------------------------------------------------------------------------------
# The checked app: one threaded HTTP server answering 200 on every path
# --------------------------------------------------------------------------------------------


class App:
    """200 on every path; the body is constant, or holds the time when ``changing`` is set."""

    def __init__(self) -> None:
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                app.hits += 1
                body = b"ok\n" if not app.changing else f"ok {time.time_ns()}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.hits = 0
        self.changing = False
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_range(count: int) -> tuple[int, int]:
    """``count`` consecutive ports that are free on 127.0.0.1 and 0.0.0.0 now (a sidecar binds
    0.0.0.0 by default), below the kernel's ephemeral range (32768 and up here), where outgoing
    connections would take ports out of a range under our feet."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(21000, 32000 - count)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))  # noqa: S104 (bound and closed at once: a check)
            return base, base + count - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def wait_for(what: str, cond: Any, timeout: float, every: float = 0.2) -> float:
    """Poll ``cond`` until it is true; the seconds it took. Raises after ``timeout``."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def passing_checks(server: str, node: str, prefix: str) -> int:
    checks = get_json(f"{server}/v1/health/node/{node}") or []
    return sum(
        1
        for c in checks
        if c.get("ServiceName", "").startswith(prefix) and c["Status"] == "passing"
    )


def measure_window(
    relay: Relay, agent: Banner, seconds: float, label: str, app: App
) -> dict[str, Any]:
    """Server requests caused by the agent, and the agent's CPU and RSS, over ``seconds``."""
    pids = agent.pids()
    c0 = cpu_by_pid(pids)
    hits0 = app.hits
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    c1 = cpu_by_pid(pids)
    used = sum(c1[p] - c0[p] for p in c1 if p in c0)
    counts = relay.window(t0, t1)
    total = sum(counts.values())
    res = {
        "phase": label,
        "seconds": round(t1 - t0, 1),
        "probes": app.hits - hits0,
        "probes_per_s": round((app.hits - hits0) / (t1 - t0), 1),
        "server_requests": total,
        "server_rps": round(total / (t1 - t0), 3),
        "by_endpoint": dict(counts.most_common()),
        "agent_cpu_pct": round(100 * used / (t1 - t0), 2),
        "agent_rss_mib": rss_mib([agent.pid]),
    }
    log(
        f"{label}: {res['server_requests']} server requests in {res['seconds']}s"
        f" ({res['server_rps']}/s), {res['probes']} probes, agent CPU"
        f" {res['agent_cpu_pct']}%, RSS {res['agent_rss_mib']} MiB; {res['by_endpoint']}"
    )
    return res


def run(args: argparse.Namespace, procs: list[Proc], closers: list[Any]) -> dict[str, Any]:
    res: dict[str, Any] = {
        "machine": machine(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "load_average": os.getloadavg(),
        "params": {
            "services": args.services,
            "interval": args.interval,
            "seconds": args.seconds,
            "sidecars": args.sidecars,
        },
    }
    res["others_cpu_pct_before"] = background_before_run(30, log)
    base = Path(tempfile.mkdtemp(prefix="trellis-bench-agent-"))
    closers.append(lambda: shutil.rmtree(base, ignore_errors=True))
    conf = base / "agent-conf"
    conf.mkdir()

    server = Banner("server")
    procs.append(server)
    server.start(
        [
            TRELLIS,
            "server",
            *("-data-dir", str(base / "server"), "-http-port", "0", "-dns-port", "-1"),
            *("-workers", "1", "-node", "srv"),
        ],
        "/v1/status/leader",
    )
    log(f"server {server.url} (PID {server.pid})")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    relay = Relay((host, int(port))).start()
    closers.append(relay.stop)

    app = App()
    closers.append(app.stop)
    for i in range(args.services):
        svc = {
            "service": {
                "name": f"chk-{i:03d}",
                "port": app.port,
                "check": {
                    "http": f"http://127.0.0.1:{app.port}/health/{i}",
                    "interval": args.interval,
                    "timeout": "5s",
                },
            }
        }
        (conf / f"chk-{i:03d}.json").write_text(json.dumps(svc))

    lo, hi = free_range(max(args.sidecars + 14, 64))
    res["proxy_port_range"] = [lo, hi]
    node = "bench-node"
    agent = Banner("agent")
    procs.append(agent)
    t_start = time.monotonic()
    agent.start(
        [
            TRELLIS,
            "agent",
            *("-server", f"127.0.0.1:{relay.port}", "-node", node, "-http-port", "0"),
            *("-data-dir", str(base / "agent-data"), "-config-dir", str(conf)),
            *("-proxy-min-port", str(lo), "-proxy-max-port", str(hi)),
        ],
        "/v1/agent/self",
    )
    log(f"agent {agent.url} (PID {agent.pid}), relay 127.0.0.1:{relay.port}")
    took = wait_for(
        f"{args.services} passing checks in the catalog",
        lambda: passing_checks(server.url, node, "chk-") >= args.services,
        timeout=120 + 3 * parse_seconds(args.interval),
        every=0.5,
    )
    res["checks_all_passing_s"] = round(time.monotonic() - t_start, 1)
    log(f"all {args.services} checks passing in the catalog after {took:.1f}s")
    res["startup_server_requests"] = len(relay.events)
    # One more interval, so every check has run once more after the first pass.
    time.sleep(parse_seconds(args.interval) + 1)

    res["steady"] = measure_window(relay, agent, args.seconds, "steady output", app)
    app.changing = True
    time.sleep(parse_seconds(args.interval) + 1)
    res["changing"] = measure_window(relay, agent, args.seconds, "changing output", app)
    app.changing = False

    if args.sidecars:
        res["sidecars"] = sidecars(args, server, agent, relay, app, conf, node)
    res["server_rss_mib"] = rss_mib(server.pids())
    res["agent_problems"] = sum("Traceback" in x or "[ERROR]" in x for x in agent.lines)
    return res


def sidecars(
    args: argparse.Namespace,
    server: Banner,
    agent: Banner,
    relay: Relay,
    app: App,
    conf: Path,
    node: str,
) -> dict[str, Any]:
    """Add ``--sidecars`` one-line connect.proxy services, SIGHUP, time them until up."""
    n = args.sidecars
    names = [f"sc-{i:02d}" for i in range(n)]
    for name in names:
        svc = {"service": {"name": name, "port": app.port, "connect": {"proxy": {}}}}
        (conf / f"{name}.json").write_text(json.dumps(svc))
    before = set(agent.pids())
    cpu_before = cpu_by_pid(list(before))
    r0 = len(relay.events)
    t0 = time.monotonic()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)

    ports: dict[str, int] = {}
    listening: set[str] = set()
    passing: set[str] = set()
    t_listen = t_pass = None
    deadline = t0 + 120
    while time.monotonic() < deadline and (t_listen is None or t_pass is None):
        agent.pids()  # remember the sidecars, so that stop() ends them by PID
        if len(ports) < n:
            with contextlib.suppress(OSError, ValueError):
                for s in (get_json(f"{agent.url}/v1/agent/services") or {}).values():
                    if s.get("Kind") == "connect-proxy":
                        dest = s.get("Proxy", {}).get("DestinationServiceName")
                        if dest in names:
                            ports[dest] = s["Port"]
        for name, port in ports.items():
            if name in listening:
                continue
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5),
            ):
                listening.add(name)
        if t_listen is None and len(listening) == n:
            t_listen = time.monotonic() - t0
            log(f"all {n} sidecars accept connections after {t_listen:.2f}s")
        for name in names:
            if name in passing:
                continue
            with contextlib.suppress(OSError, ValueError):
                if get_json(f"{server.url}/v1/health/connect/{name}?passing"):
                    passing.add(name)
        if t_pass is None and len(passing) == n:
            t_pass = time.monotonic() - t0
            log(f"all {n} sidecars passing in /v1/health/connect after {t_pass:.2f}s")
        time.sleep(0.1)
    started_s = time.monotonic() - t0
    pids = agent.pids()
    side = [p for p in pids if p not in before]
    cpu_now = cpu_by_pid(pids)
    start_cpu_agent = cpu_now.get(agent.pid, 0) - cpu_before.get(agent.pid, 0)
    start_cpu_side = sum(cpu_now.get(p, 0) for p in side)
    out: dict[str, Any] = {
        "count": n,
        "all_listening_s": round(t_listen, 2) if t_listen is not None else None,
        "all_passing_s": round(t_pass, 2) if t_pass is not None else None,
        "listening": len(listening),
        "passing": len(passing),
        "sidecar_processes": len(side),
        "startup_cpu_s": {"agent": round(start_cpu_agent, 1), "sidecars": round(start_cpu_side, 1)},
        "startup_server_requests": len(relay.events) - r0,
        "startup_window_s": round(started_s, 1),
    }
    # Idle: every sidecar up, nothing happening; what they cost the node and the server.
    time.sleep(5)
    pids = agent.pids()
    side = [p for p in pids if p != agent.pid]
    c0 = cpu_by_pid(pids)
    t1 = time.monotonic()
    idle_s = min(args.seconds, 30)
    time.sleep(idle_s)
    t2 = time.monotonic()
    c1 = cpu_by_pid(pids)
    counts = relay.window(t1, t2)
    side_cpu = sum(c1[p] - c0[p] for p in side if p in c0 and p in c1)
    agent_cpu = c1.get(agent.pid, 0) - c0.get(agent.pid, 0)
    out["idle"] = {
        "seconds": round(t2 - t1, 1),
        "agent_cpu_pct": round(100 * agent_cpu / (t2 - t1), 2),
        "sidecars_cpu_pct": round(100 * side_cpu / (t2 - t1), 2),
        "agent_rss_mib": rss_mib([agent.pid]),
        "sidecars_rss_mib": rss_mib(side),
        "sidecar_rss_mib_each": round(rss_mib(side) / max(1, len(side)), 1),
        "server_rps": round(sum(counts.values()) / (t2 - t1), 3),
        "by_endpoint": dict(counts.most_common()),
    }
    log(f"sidecars idle: {out['idle']}")
    return out


def server_parked(server: str) -> int:
    """Blocking queries parked on the server now (its own count; 1 worker: all of them)."""
    return int(get_json(f"{server}/v1/agent/self")["Stats"]["blocking"]["waiting"])


def shared_upstream(args: argparse.Namespace, procs: list[Proc], closers: list[Any]) -> dict:
    """``--shared K``: K managed sidecars on one agent sharing the upstream ``db``; what they
    cost the server (parked queries, requests/s), from the server's side and the relay's."""
    k = args.shared
    res: dict[str, Any] = {
        "machine": machine(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "load_average": os.getloadavg(),
        "params": {"shared": k, "seconds": args.seconds},
    }
    base = Path(tempfile.mkdtemp(prefix="trellis-bench-agent-shared-"))
    closers.append(lambda: shutil.rmtree(base, ignore_errors=True))
    conf = base / "agent-conf"
    conf.mkdir()
    server = Banner("server")
    procs.append(server)
    server.start(
        [
            TRELLIS,
            "server",
            *("-data-dir", str(base / "server"), "-http-port", "0", "-dns-port", "-1"),
            *("-workers", "1", "-node", "srv"),
        ],
        "/v1/status/leader",
    )
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    relay = Relay((host, int(port))).start()
    closers.append(relay.stop)
    app = App()
    closers.append(app.stop)
    lo, hi = free_range(k + 1)
    up_lo, _ = free_range(k)
    svc = {"service": {"name": "db", "port": app.port, "connect": {"proxy": {}}}}
    (conf / "db.json").write_text(json.dumps(svc))
    for i in range(k):
        ups = [{"destination_name": "db", "local_bind_port": up_lo + i}]
        svc = {
            "service": {
                "name": f"app-{i:02d}",
                "port": app.port,
                "connect": {"proxy": {"config": {"upstreams": ups}}},
            }
        }
        (conf / f"app-{i:02d}.json").write_text(json.dumps(svc))
    parked_alone = server_parked(server.url)
    agent = Banner("agent")
    procs.append(agent)
    t0 = time.monotonic()
    agent.start(
        [
            TRELLIS,
            "agent",
            *("-server", f"127.0.0.1:{relay.port}", "-node", "bench-node", "-http-port", "0"),
            *("-data-dir", str(base / "agent-data"), "-config-dir", str(conf)),
            *("-proxy-min-port", str(lo), "-proxy-max-port", str(hi)),
        ],
        "/v1/agent/self",
    )

    def all_listening() -> bool:
        agent.pids()  # remember the sidecars, so that stop() ends them by PID
        for p in range(up_lo, up_lo + k):
            try:
                socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
            except OSError:
                return False
        return bool(get_json(f"{server.url}/v1/health/connect/db?passing"))

    wait_for(f"{k} upstream listeners and db passing", all_listening, timeout=180, every=0.5)
    res["ready_s"] = round(time.monotonic() - t0, 1)
    log(f"{k} sidecars with the upstream db ready after {res['ready_s']}s")
    time.sleep(10)  # every follower past its first reads, its watches parked
    samples = []
    for _ in range(5):
        samples.append(server_parked(server.url))
        time.sleep(1)
    t1 = time.monotonic()
    time.sleep(args.seconds)
    t2 = time.monotonic()
    counts = relay.window(t1, t2)
    res.update(
        {
            "sidecars": len([p for p in agent.pids() if p != agent.pid]),
            "server_parked_without_agent": parked_alone,
            "server_parked": sorted(samples)[len(samples) // 2],
            "server_parked_samples": samples,
            "window_s": round(t2 - t1, 1),
            "server_requests": sum(counts.values()),
            "server_rps": round(sum(counts.values()) / (t2 - t1), 3),
            "by_endpoint": dict(counts.most_common()),
        }
    )
    log(f"shared upstream: {res}")
    return res


def report_shared(res: dict[str, Any]) -> str:
    m = res["machine"]
    return "\n".join(
        [
            f"Node agent benchmark (shared upstream), {res['started']}",
            f"machine: {m['nproc']} x {m['cpu']}, {m['memory']}, Python {m['python']}",
            f"{res['params']['shared']} managed sidecars with the upstream db, and db's:"
            f" {res['sidecars']} sidecar processes, ready after {res['ready_s']} s",
            f"  blocking queries parked on the server: {res['server_parked']}"
            f" (samples {res['server_parked_samples']}; {res['server_parked_without_agent']}"
            " before the agent started)",
            f"  server requests from the agent over {res['window_s']} s:"
            f" {res['server_requests']} ({res['server_rps']}/s) {res['by_endpoint']}",
        ]
    )


def parse_seconds(d: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", d.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {d!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [
        f"Node agent benchmark, {res['started']}",
        f"machine: {m['nproc']} x {m['cpu']}, {m['memory']}, Python {m['python']}, {m['os']}",
        f"load average before: {' '.join(f'{x:.2f}' for x in res['load_average'])};"
        f" others' CPU before: {res['others_cpu_pct_before']}%",
        f"{res['params']['services']} services with HTTP checks every"
        f" {res['params']['interval']}; all passing in the catalog"
        f" {res['checks_all_passing_s']}s after the agent started"
        f" ({res['startup_server_requests']} server requests until then)",
        "",
    ]
    rows = []
    for key in ("steady", "changing"):
        r = res[key]
        rows.append(
            [
                r["phase"],
                fmt(r["seconds"]),
                fmt(r["probes_per_s"]),
                str(r["server_requests"]),
                fmt(r["server_rps"], 3),
                fmt(r["agent_cpu_pct"], 2),
                fmt(r["agent_rss_mib"]),
            ]
        )
    out.append(
        table(
            rows,
            [
                "checks",
                "seconds",
                "probes/s",
                "server reqs",
                "server req/s",
                "agent CPU%",
                "agent RSS MiB",
            ],
        )
    )
    for key in ("steady", "changing"):
        out.append(f"  {key}: {res[key]['by_endpoint']}")
    sc = res.get("sidecars")
    if sc:
        idle = sc["idle"]
        out += [
            "",
            f"{sc['count']} managed sidecars (SIGHUP after adding their files):",
            f"  all listening after {fmt(sc['all_listening_s'], 2)} s"
            f" ({sc['listening']}/{sc['count']}); all passing in /v1/health/connect after"
            f" {fmt(sc['all_passing_s'], 2)} s ({sc['passing']}/{sc['count']})",
            f"  {sc['sidecar_processes']} sidecar processes; CPU while starting: agent"
            f" {sc['startup_cpu_s']['agent']} s, sidecars {sc['startup_cpu_s']['sidecars']} s;"
            f" {sc['startup_server_requests']} server requests",
            f"  idle over {idle['seconds']} s: agent {idle['agent_cpu_pct']}% CPU,"
            f" {idle['agent_rss_mib']} MiB; sidecars {idle['sidecars_cpu_pct']}% CPU,"
            f" {idle['sidecars_rss_mib']} MiB ({idle['sidecar_rss_mib_each']} MiB each);"
            f" server {idle['server_rps']} req/s {idle['by_endpoint']}",
        ]
    out.append(
        f"server RSS {res['server_rss_mib']} MiB; agent log problems: {res['agent_problems']}"
    )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=200, help="services with an HTTP check")
    p.add_argument("--interval", default="10s", help="the checks' interval (default 10s)")
    p.add_argument("--seconds", type=float, default=60.0, help="each measuring window")
    p.add_argument("--sidecars", type=int, default=50, help="managed sidecars (0: none)")
    p.add_argument("--agent-log", metavar="FILE", help="write the agent's output to FILE")
    p.add_argument(
        "--shared",
        type=int,
        default=0,
        metavar="K",
        help="only the shared-upstream measurement, with K sidecars (see the docstring)",
    )
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
    args = p.parse_args()
    args.services = max(1, min(args.services, 1000))
    args.sidecars = max(0, min(args.sidecars, 200))
    args.seconds = max(5.0, min(args.seconds, 600.0))
    args.shared = max(0, min(args.shared, 100))
    parse_seconds(args.interval)
    if not Path(TRELLIS).exists():
        log(f"{TRELLIS} is missing: run make first")
        return 1
    procs: list[Proc] = []
    closers: list[Any] = []
    # SIGTERM ends the run as Ctrl-C does, through the same cleanup; SIGINT too when the
    # shell that started this in the background had it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        res = shared_upstream(args, procs, closers) if args.shared else run(args, procs, closers)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    except Exception as e:
        log(f"failed: {e}")
        for proc in procs:
            if proc.lines:
                log(f"last output of {proc.name}:\n{proc.output(30)}")
        return 1
    finally:
        # The agent first (it stops its sidecars), then the server; each by PID, with every
        # child it was seen to have.
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                proc.stop()
        if args.agent_log and len(procs) > 1:
            Path(args.agent_log).write_text("\n".join(procs[1].lines) + "\n")
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
    write_output(res, report_shared if args.shared else report, args.json, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
