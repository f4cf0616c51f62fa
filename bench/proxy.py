#!/usr/bin/env python3
"""Data-plane benchmark: a Trellis sidecar pair against a HAProxy mutual-TLS pair, a native
(SDK) pair, and direct.

In one run, on this machine, with one load generator and one echo backend (both ``tcpload``,
written in C so that they take little of the two cores):

* **direct**: the load generator to the echo backend;
* **trellis**: load -> a developer proxy (``trellis connect proxy -service bench-client
  -upstream bench-app:P``) -> mutual TLS -> the app's sidecar (``-sidecar-for bench-app``) ->
  echo, with a real ``trellis dev`` as the control plane;
* **haproxy**: load -> HAProxy (client side: ``crt``, ``ca-file``, ``verify required``,
  ``no-ssl-reuse``) -> TLS 1.3 -> HAProxy (server side: ``verify required``) -> echo, one
  thread each (``nbthread 1``, as each Trellis proxy is one process), with leaves the Trellis
  CA signed for the same two identities;
* **native**: no proxy at all: a native client (``bench/native.py client``, a ``Service`` of
  ``trellis.connect`` whose load threads call ``Service.connect``) -> mutual TLS -> a native
  server (``bench/native.py server``: ``server_ssl_context()``, ``authorize()``, an echo),
  registered as Connect-native in the same ``trellis dev``. The load generator is the client
  app itself, so its CPU column holds the load's own work too (see bench/native.py). No bulk
  figure for this row.

Measures, each run on fresh connections, in interleaved rounds (direct, trellis, haproxy,
then again), medians reported: bulk MB/s over one connection; 1 KiB request/response per
second with p50/p99 at concurrency 1 and 32; new connections per second (each a full mTLS
handshake: no session resumption on either side); CPU seconds per proxy per measure; peak RSS
per proxy, idle and with 1,000 connections open. It prints the ratios Trellis/HAProxy and
Trellis/direct, and native/Trellis (native against the sidecar pair) and native/HAProxy.

A second part (``--fanout N``) measures how long an intention change takes to reach N
sidecars: N apps with sidecars, one client proxy with an upstream to each, one connection open
to each; then ``fan-client => *`` is denied, and for each sidecar the time until its open
connection is closed and until a new one is refused is recorded (p50/p99). ``--only fanout``
runs this part alone (``--only pair`` the first part alone).

Every process is started here, binds 127.0.0.1, and is stopped by PID at the end (also on
an error or Ctrl-C). Loads are bounded in time. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procs import (
    Proc,
    background_before_run,
    children_of,
    cpu_by_pid,
    cpu_seconds,
    free_port,
    process_tree,
    system_busy,
)
from report import fmt, table, write_output
from report import machine as describe_machine

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from trellis.proxy import spiffe  # noqa: E402
from trellis.proxy import x509 as px  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent
PASSING = [{"Name": "bench up", "TTL": "24h", "Status": "passing"}]


def log(msg: str) -> None:
    print(f"[bench-proxy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------


class Line(Proc):
    """A process whose output we watch for a line (a banner, a port)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._want: re.Pattern[str] | None = None
        self._got = threading.Event()
        self.match: re.Match[str] | None = None

    def on_line(self, line: str) -> None:
        if self._want is not None and not self._got.is_set():
            m = self._want.search(line)
            if m:
                self.match = m
                self._got.set()

    def start(self, args: list[str], cwd: str, want: str, timeout: float = 60.0) -> Line:
        self._want = re.compile(want)
        self.spawn(args, cwd=cwd)
        if not self._got.wait(timeout):
            raise RuntimeError(f"{self.name} did not start:\n{self.output()}")
        return self


def compile_tcpload(tmp: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) for bench/tcpload.c")
    out = os.path.join(tmp, "tcpload")
    subprocess.run([cc, "-O2", "-o", out, str(REPO / "bench" / "tcpload.c")], check=True)
    return out


def api(url: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def echoes(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"ping")
            s.settimeout(2)
            return s.recv(4) == b"ping"
    except OSError:
        return False


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_now_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# -- the setup ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, tmp: str, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.procs: list[Proc] = []
        self.tcpload = compile_tcpload(tmp)
        self.ports: dict[str, int] = {}
        self.proxy_pids: dict[str, list[int]] = {}
        self.url = ""
        self.dev_pid = 0

    def proc(self, name: str, args: list[str], want: str, **kw: Any) -> Line:
        p = Line(name)
        self.procs.append(p)
        return p.start(args, self.tmp, want, **kw)

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()

    def server_pids(self) -> list[int]:
        """trellis dev's master and gunicorn workers, without its node agent (idle here)."""
        tree = process_tree(self.dev_pid)
        agents = [p for p in children_of(self.dev_pid) if b"agent" in _cmdline(p)]
        skip = {q for a in agents for q in process_tree(a)}
        return [p for p in tree if p not in skip]

    def _workers(self) -> int:
        """trellis dev's gunicorn workers: one, unless the fan-out runs.

        Every proxy holds one connection to the server per blocking query (roots, intentions,
        its registration, one per upstream: 3-4 for a sidecar, 51 for the fan-out's client),
        all from 127.0.0.1, and a worker caps one client address at
        ``limits.http_max_conns_per_client`` (200) connections. 50 sidecars and the client
        hold about 250, so one worker refuses some with 429 (the intention write too); two
        workers, which the kernel feeds evenly (SO_REUSEPORT), hold them. The node agent
        (issue 11) is meant to fold a host's sidecars into one client of the server.
        """
        if self.args.workers:
            return int(self.args.workers)
        return 2 if self.args.fanout and self.args.only != "pair" else 1

    def start(self, pairs: bool = True) -> None:
        echo = self.proc("echo", [self.tcpload, "echo", "0"], r"^(\d+)$")
        assert echo.match is not None
        self.ports["direct"] = int(echo.match.group(1))
        dev = self.proc(
            "trellis dev",
            [str(BIN / "trellis"), "dev", "-http-port", "0", "-dns-port", "-1",
             "-data-dir", os.path.join(self.tmp, "dev"), "-workers", str(self._workers())],
            # The server's own API, not dev's node agent in front of it (issue 11): the
            # proxies follow the server directly, as in every earlier run of this benchmark,
            # and the control plane's CPU below is the server's.
            r"Server API: (http://\S+)",
        )  # fmt: skip
        assert dev.match is not None
        self.url = dev.match.group(1)
        self.dev_pid = dev.pid
        wait_for(lambda: _ok(self.url + "/v1/status/leader"), 30, "trellis dev")
        if pairs:
            self._trellis_pair()
            self._haproxy_pair()
            self._native_pair()

    def _trellis_pair(self) -> None:
        public = free_port()
        api(self.url, "PUT", "/v1/agent/service/register", {
            "Name": "bench-app", "Address": "127.0.0.1", "Port": self.ports["direct"],
            "Connect": {"SidecarService": {"Port": public, "Checks": PASSING}},
        })  # fmt: skip
        server = self.proc(
            "trellis sidecar",
            [str(BIN / "trellis"), "connect", "proxy", "-sidecar-for", "bench-app",
             "-http-addr", self.url, "-log-level", "warn"],
            "Log data will now stream",
        )  # fmt: skip
        up = free_port()
        client = self.proc(
            "trellis client proxy",
            [str(BIN / "trellis"), "connect", "proxy", "-service", "bench-client",
             "-upstream", f"bench-app:{up}", "-http-addr", self.url, "-log-level", "warn"],
            "Log data will now stream",
        )  # fmt: skip
        self.ports["trellis"] = up
        self.proxy_pids["trellis"] = [client.pid, server.pid]
        wait_for(lambda: echoes(up), 30, "the Trellis pair")

    def _haproxy_pair(self) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            raise RuntimeError("haproxy not found: apt-get install haproxy")
        roots = api(self.url, "GET", "/v1/connect/ca/roots")
        td = roots["TrustDomain"]
        ca = "".join(r["RootCert"] for r in roots["Roots"])
        files = {"ca": ca}
        for name in ("bench-app", "bench-client"):
            key = px.generate_key()
            csr = px.build_csr(key, spiffe.service_id(td, "dc1", name))
            pem = csr.public_bytes(serialization.Encoding.PEM).decode()
            issued = api(self.url, "POST", "/v1/connect/ca/sign", {"CSR": pem})
            # HAProxy reads its key from a file: the peer's keys, in this run's temp dir only.
            files[name] = issued["CertPEM"] + px.key_pem(key)
        for name, text in files.items():
            path = os.path.join(self.tmp, f"{name}.pem")
            Path(path).write_text(text)
            os.chmod(path, 0o600)
        srv_port, cli_port = free_port(), free_port()
        common = (
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n"
            "  timeout connect 10s\n  timeout client 120s\n  timeout server 120s\n"
        )
        srv_cfg = common + (
            f"listen srv\n  bind 127.0.0.1:{srv_port} ssl crt {self.tmp}/bench-app.pem"
            f" ca-file {self.tmp}/ca.pem verify required ssl-min-ver TLSv1.3\n"
            f"  server app 127.0.0.1:{self.ports['direct']}\n"
        )
        cli_cfg = common + (
            f"listen cli\n  bind 127.0.0.1:{cli_port}\n"
            f"  server up 127.0.0.1:{srv_port} ssl crt {self.tmp}/bench-client.pem"
            f" ca-file {self.tmp}/ca.pem verify required ssl-min-ver TLSv1.3 no-ssl-reuse\n"
        )
        pids = []
        for name, cfg in (("srv", srv_cfg), ("cli", cli_cfg)):
            path = os.path.join(self.tmp, f"haproxy-{name}.cfg")
            Path(path).write_text(cfg)
            p = Line(f"haproxy {name}")
            self.procs.append(p)
            p.spawn([exe, "-db", "-f", path], cwd=self.tmp)  # -db: foreground, our child
            pids.append(p.pid)
        self.ports["haproxy"] = cli_port
        self.proxy_pids["haproxy"] = [pids[1], pids[0]]  # client side first, as for trellis
        wait_for(lambda: echoes(cli_port), 30, "the HAProxy pair")

    def _native_pair(self) -> None:
        script = str(REPO / "bench" / "native.py")
        server = self.proc(
            "native server", [PY, script, "server", self.url, "bench-native"], r"^port (\d+)$"
        )
        assert server.match is not None
        api(self.url, "PUT", "/v1/agent/service/register", {
            "Name": "bench-native", "Address": "127.0.0.1", "Port": int(server.match.group(1)),
            "Connect": {"Native": True}, "Checks": PASSING,
        })  # fmt: skip
        client = self.proc(
            "native client",
            [PY, script, "client", self.url, "bench-native-client", "bench-native"],
            r"^control (\d+)$",
        )
        assert client.match is not None
        self.ports["native"] = int(client.match.group(1))  # the client's control port
        self.proxy_pids["native"] = [client.pid, server.pid]
        wait_for(lambda: self.native("probe") == ["ok"], 30, "the native pair")

    def native(self, command: str) -> list[str]:
        """One command to the native client (see bench/native.py); its answer's words."""
        with socket.create_connection(("127.0.0.1", self.ports["native"]), timeout=10) as s:
            s.sendall(command.encode() + b"\n")
            s.settimeout(300)
            answer = s.makefile().readline().split()
        if not answer or answer[0] == "error":
            raise RuntimeError(f"native client: {command}: {' '.join(answer)}")
        return answer

    # -- measures ----------------------------------------------------------------------------

    def load(self, *args: str) -> list[str]:
        r = subprocess.run(
            [self.tcpload, *args], capture_output=True, text=True, timeout=300, check=False
        )
        if r.returncode not in (0, 1):
            raise RuntimeError(f"tcpload {args}: {r.stderr}")
        return r.stdout.split()

    def measure(self, target: str, what: str) -> dict[str, Any]:
        port = str(self.ports[target])
        pids = self.proxy_pids.get(target, [])
        before = cpu_by_pid(pids)
        a = self.args
        if what == "bulk":
            got, secs = self.load("bulk", "127.0.0.1", port, str(a.bulk_bytes))
            res = {"MBps": int(got) / float(secs) / 1e6}
        else:
            mode, conc = {"c1": ("rr", 1), "c32": ("rr", 32), "conn": ("conn", a.conn_conc)}[what]
            if target == "native":  # the client app is the load generator
                n, secs, p50, p99, fails = self.native(f"{mode} {conc} {a.seconds} 1024")
            else:
                n, secs, p50, p99, fails = self.load(
                    mode, "127.0.0.1", port, str(conc), str(a.seconds), "1024"
                )
            res = {"per_s": int(n) / float(secs), "p50_us": float(p50), "p99_us": float(p99),
                   "failures": int(fails)}  # fmt: skip
        after = cpu_by_pid(pids)
        res["cpu_s"] = [round(after.get(p, 0) - before.get(p, 0), 3) for p in pids]
        return res

    def rss(self, target: str) -> dict[str, Any]:
        """Peak RSS of each proxy idle, then with ``--open`` connections held through it (the
        native pair: its two processes, idle, after the load steps)."""
        pids = self.proxy_pids[target]
        idle = [rss_now_kb(p) for p in pids]
        if target == "native":
            return {"idle_kb": idle, "open_kb": [], "peak_kb": [rss_peak_kb(p) for p in pids]}
        socks = []
        try:
            for _ in range(self.args.open):
                s = socket.create_connection(("127.0.0.1", self.ports[target]), timeout=10)
                s.sendall(b"x")
                socks.append(s)
            for s in socks:
                s.settimeout(10)
                s.recv(1)
            loaded = [rss_now_kb(p) for p in pids]
        finally:
            for s in socks:
                s.close()
        return {"idle_kb": idle, "open_kb": loaded, "peak_kb": [rss_peak_kb(p) for p in pids]}


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# -- the intention fan-out -----------------------------------------------------------------------


#: Ports ``listen_port`` handed out in this run: a second listener must not get one of them.
_given: set[int] = set()


def listen_port() -> int:
    """A free port below the kernel's ephemeral range, for a listener that binds it later.

    ``free_port()`` returns a port from the ephemeral range: while 50 sidecars start, their
    own outgoing connections (four blocking queries each) may take it before the proxy that
    was told to listen on it does. A port below the range is never handed to a ``connect``.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    return free_port()


FAN_DENY = "/v1/connect/intentions/exact?source=fan-client&destination=*"


def _pcts(xs: list[float | None]) -> dict[str, Any]:
    done = sorted(x for x in xs if x is not None)
    if not done:
        return {"reached": 0}
    return {
        "reached": len(done),
        "min_ms": done[0] * 1000,
        "p50_ms": done[len(done) // 2] * 1000,
        "p99_ms": done[min(len(done) - 1, int(len(done) * 0.99))] * 1000,
        "max_ms": done[-1] * 1000,
    }


def _probe(port: int) -> bool | None:
    """One new connection through the client proxy: True if it echoes, False if the proxy
    closes or resets it (the sidecar refused it), None if it timed out (neither)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"y")
            c.settimeout(2)
            return c.recv(1) == b"y"
    except TimeoutError:
        return None
    except OSError:
        return False


def fanout(b: Bench, n: int) -> dict[str, Any]:
    """Time from one intention write to each of ``n`` sidecars closing the open connection
    (phase 1), and refusing new ones (phase 2).

    The phases are apart because a probe for "refused" is a full mTLS handshake through the
    one client proxy: 50 of them in a loop take most of the two cores, and would slow the
    closes that phase 1 measures. Phase 2 probes before the write too, so the probes'
    own duration (the resolution of that figure) is reported beside it.
    """
    log(f"fan-out: starting {n} apps' sidecars")
    ups = []
    sidecars: list[int] = []
    for i in range(n):
        name = f"fan-{i}"
        api(b.url, "PUT", "/v1/agent/service/register", {
            "Name": name, "Address": "127.0.0.1", "Port": b.ports["direct"],
            "Connect": {"SidecarService": {"Port": listen_port(), "Checks": PASSING}},
        })  # fmt: skip
        sidecar = b.proc(
            f"sidecar {name}",
            [str(BIN / "trellis"), "connect", "proxy", "-sidecar-for", name,
             "-http-addr", b.url, "-log-level", "error"],
            "Log data will now stream", timeout=120,
        )  # fmt: skip
        sidecars.append(sidecar.pid)
        ups.append((name, listen_port()))
    b.proc(
        "fan-out client",
        [str(BIN / "trellis"), "connect", "proxy", "-service", "fan-client",
         *[x for name, port in ups for x in ("-upstream", f"{name}:{port}")],
         "-http-addr", b.url, "-log-level", "error"],
        "Log data will now stream", timeout=120,
    )  # fmt: skip
    for _, port in ups:
        wait_for(lambda port=port: echoes(port), 60, f"upstream {port}")

    # Phase 1: one open connection through each sidecar; nothing else runs.
    held = []
    for _, port in ups:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"x")
        s.settimeout(5)
        s.recv(1)
        s.settimeout(10)
        held.append(s)
    closed: list[float | None] = [None] * n
    t0 = [0.0]

    # A close is an end of stream or a reset; a timeout is neither (the change never came).
    def watch_closed(i: int, s: socket.socket) -> None:
        try:
            got = s.recv(1)
        except TimeoutError:
            return
        except OSError:
            got = b""
        if got == b"":
            closed[i] = time.monotonic() - t0[0]

    threads = [threading.Thread(target=watch_closed, args=(i, s)) for i, s in enumerate(held)]
    for t in threads:
        t.start()  # each parks in recv before the write
    server = b.server_pids()
    cpu0 = (cpu_seconds(sidecars), cpu_seconds(server), system_busy())
    t0[0] = time.monotonic()
    api(b.url, "PUT", FAN_DENY, {"Action": "deny"})
    write_s = time.monotonic() - t0[0]
    for t in threads:
        t.join(15)
    spent = time.monotonic() - t0[0]
    cpu1 = (cpu_seconds(sidecars), cpu_seconds(server), system_busy())
    for s in held:
        s.close()
    load_1 = os.getloadavg()[0]

    # Phase 2: lift the deny, let every upstream echo again, then probe each in a loop
    # across a second write of the deny.
    # The follower's blocking queries wait 60 s: a sidecar that misses the lift would show
    # here as one that takes up to that long, so wait longer than that and report it.
    lifted = time.monotonic()
    api(b.url, "DELETE", FAN_DENY)
    pending = dict(enumerate(port for _, port in ups))
    allowed_again: list[float | None] = [None] * n
    while pending and time.monotonic() < lifted + 90:
        for i, port in list(pending.items()):
            if _probe(port):
                allowed_again[i] = time.monotonic() - lifted
                del pending[i]
        time.sleep(0.05)
    if pending:
        raise RuntimeError(f"fan-out: {sorted(pending)} not allowed again 90 s after the lift")
    late = {f"fan-{i}": round(x, 1) for i, x in enumerate(allowed_again) if x and x > 5}
    if late:
        log(f"fan-out: the lift of the deny reached these sidecars late (s): {late}")
    refused: list[float | None] = [None] * n
    probe_s: list[float | None] = []
    written = threading.Event()
    stop = time.monotonic() + 20

    def watch_refused(i: int, port: int) -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            got = _probe(port)
            if got is False and written.is_set():
                refused[i] = time.monotonic() - t0[0]
                return
            if got and not written.is_set():
                probe_s.append(time.monotonic() - started)
            time.sleep(0.01)

    threads = [threading.Thread(target=watch_refused, args=(i, p)) for i, (_, p) in enumerate(ups)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # a benchmark, not a test: let the probes reach their steady pace
    t0[0] = time.monotonic()
    written.set()
    api(b.url, "PUT", FAN_DENY, {"Action": "deny"})
    for t in threads:
        t.join(25)

    return {
        "sidecars": n,
        "write_ms": write_s * 1000,
        "existing_closed": _pcts(closed),
        "new_refused": _pcts(refused),
        "probe": _pcts(probe_s),
        "lift_allowed_again": _pcts(allowed_again),
        "loadavg_1m": load_1,
        # CPU seconds from the write until every close was seen (10 ms ticks): all the
        # sidecars together, the server, and the whole machine (2 cores: at most 2 x wall).
        "phase1_wall_s": round(spent, 3),
        "phase1_cpu_s": {
            "sidecars": round(cpu1[0] - cpu0[0], 2),
            "server": round(cpu1[1] - cpu0[1], 2),
            "machine": round(cpu1[2] - cpu0[2], 2),
        },
        "closed_ms": [None if x is None else round(x * 1000, 1) for x in closed],
        "refused_ms": [None if x is None else round(x * 1000, 1) for x in refused],
    }


# -- the run ------------------------------------------------------------------------------------

MEASURES = ("bulk", "c1", "c32", "conn")
TARGETS = ("direct", "trellis", "haproxy", "native")
#: What each target measures: the native pair has no bulk figure (its client is an app).
TARGET_MEASURES = {t: MEASURES if t != "native" else MEASURES[1:] for t in TARGETS}


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python bench/proxy.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    res["background_cpu_pct"] = background_before_run(args.wait_quiet, log)
    tmp = tempfile.mkdtemp(prefix="trellis-bench-proxy-")
    b = Bench(tmp, args)
    try:
        b.start(pairs=args.only != "fanout")
        if args.only == "rss":
            # Fresh proxies, no load before: what a sidecar costs idle and holding --open
            # connections, without the allocator's high-water mark from the load steps.
            res["rss"] = {t: b.rss(t) for t in ("trellis", "haproxy")}
        elif args.only != "fanout":
            raw: dict[str, dict[str, list[dict[str, Any]]]] = {
                t: {m: [] for m in MEASURES} for t in TARGETS
            }
            for rnd in range(args.rounds):
                for target in TARGETS:
                    for what in TARGET_MEASURES[target]:
                        r = b.measure(target, what)
                        raw[target][what].append(r)
                        log(f"round {rnd + 1} {target} {what}: {r}")
            res["raw"] = raw
            res["rss"] = {t: b.rss(t) for t in ("trellis", "haproxy", "native")}
        if args.fanout and args.only not in ("pair", "rss"):
            res["fanout"] = fanout(b, args.fanout)
    finally:
        b.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    return statistics.median(r[key] for r in rows) if rows else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(res: dict[str, Any]) -> str:
    out = [
        "Trellis data-plane benchmark: a sidecar pair against a HAProxy mTLS pair and a native"
        " (SDK) pair",
        f"  date: {res['date']}   command: {res['command']}",
        "  machine: {nproc} CPUs ({cpu}), {memory}, Python {python}, {os}".format(**res["machine"]),
        f"  CPU used by other processes just before the run: {res['background_cpu_pct']:.1f}%",
    ]
    if "raw" in res:
        out += _pair_report(res)
    elif "rss" in res:
        out += _rss_report(res)
    if "fanout" in res:
        f = res["fanout"]
        out.append("")
        out.append(
            f"Intention change on {f['sidecars']} sidecars (ms from the write, which took"
            f" {fmt(f.get('write_ms'))}; load average {f.get('loadavg_1m', 0):.2f} after it):"
        )
        for k in ("existing_closed", "new_refused"):
            v = f[k]
            out.append(
                f"  {k.replace('_', ' ')}: {v.get('reached', 0)}/{f['sidecars']} reached,"
                f" min {fmt(v.get('min_ms'))} p50 {fmt(v.get('p50_ms'))}"
                f" p99 {fmt(v.get('p99_ms'))} max {fmt(v.get('max_ms'))}"
            )
        v = f.get("lift_allowed_again") or {}
        out.append(
            f"  between the phases, the deny lifted: every sidecar allowed again after"
            f" max {fmt(v.get('max_ms'))} ms (probed one after another)"
        )
        c = f.get("phase1_cpu_s")
        if c:
            out.append(
                f"  CPU seconds while the closes came ({f['phase1_wall_s']} s wall): sidecars"
                f" {c['sidecars']}, server {c['server']}, whole machine {c['machine']}"
            )
        v = f.get("probe") or {}
        out.append(
            f'  (a probe for "new refused" is a new mTLS connection through the client proxy;'
            f" with {f['sidecars']} probing, one took p50 {fmt(v.get('p50_ms'))}"
            f" max {fmt(v.get('max_ms'))} before the change)"
        )
    return "\n".join(out)


def _pair_report(res: dict[str, Any]) -> list[str]:
    raw = res["raw"]
    out = [
        f"  medians of {res['config']['rounds']} interleaved rounds; 1 KiB request/response;"
        " new connections: connect, 1 KiB each way, close (a full mTLS handshake each,"
        " no resumption)",
        "",
    ]
    rows = []
    for target in TARGETS:
        r = raw[target]
        cpu = [sum(sum(x["cpu_s"]) for x in r[m]) / len(r[m]) if r[m] else None for m in MEASURES]
        rows.append([
            target,
            fmt(_median(r["bulk"], "MBps"), 0),
            fmt(_median(r["c1"], "per_s"), 0),
            fmt(_median(r["c1"], "p50_us"), 0),
            fmt(_median(r["c1"], "p99_us"), 0),
            fmt(_median(r["c32"], "per_s"), 0),
            fmt(_median(r["c32"], "p50_us"), 0),
            fmt(_median(r["c32"], "p99_us"), 0),
            fmt(_median(r["conn"], "per_s"), 0),
            "/".join(fmt(c, 2) for c in cpu) if target != "direct" else "-",
        ])  # fmt: skip
    out.append(table(rows, ["target", "bulk MB/s", "c1 req/s", "p50 us", "p99 us",
                            "c32 req/s", "p50 us", "p99 us", "conn/s",
                            "proxy cpu-s bulk/c1/c32/conn"]))  # fmt: skip
    out.append("")
    ratio_rows = []
    for m, key in (("bulk", "MBps"), ("c1", "per_s"), ("c32", "per_s"), ("conn", "per_s")):
        t = _median(raw["trellis"][m], key)
        h = _median(raw["haproxy"][m], key)
        d = _median(raw["direct"][m], key)
        n = _median(raw.get("native", {}).get(m, []), key)
        ratio_rows.append([m, fmt(_ratio(t, h), 2), fmt(_ratio(t, d), 2), fmt(_ratio(h, d), 2),
                           fmt(_ratio(n, t), 2), fmt(_ratio(n, h), 2)])  # fmt: skip
    out.append(table(ratio_rows, ["measure", "trellis/haproxy", "trellis/direct",
                                  "haproxy/direct", "native/trellis",
                                  "native/haproxy"]))  # fmt: skip
    out.append(
        "  (native: no proxies; the client app is the load generator, so its CPU figure holds"
        " the load's own work; trellis is the sidecar pair)"
    )
    out.append("")
    return out + _rss_report(res)


def _rss_report(res: dict[str, Any]) -> list[str]:
    rss = res["rss"]
    rss_rows = [
        [t, "/".join(str(k // 1024) for k in rss[t]["idle_kb"]),
         "/".join(str(k // 1024) for k in rss[t]["open_kb"]) or "-",
         "/".join(str(k // 1024) for k in rss[t]["peak_kb"])]
        for t in ("trellis", "haproxy", "native") if t in rss
    ]  # fmt: skip
    fresh = " (fresh proxies, no load before)" if res["config"]["only"] == "rss" else ""
    return [table(rss_rows, [f"RSS MB (client/server proxy){fresh}", "idle",
                             f"{res['config']['open']} open", "peak"])]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 2 s steps, no fan-out")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per step (default 5)")
    p.add_argument("--bulk-bytes", type=int, default=512 << 20, help="bulk bytes (512 MiB)")
    p.add_argument("--conn-conc", type=int, default=8, help="concurrent connectors (8)")
    p.add_argument("--open", type=int, default=1000, help="connections held for RSS (1000)")
    p.add_argument("--fanout", type=int, default=50, help="sidecars for the intention part")
    p.add_argument(
        "--workers", type=int, default=0,
        help="trellis dev's workers (default 1, or 2 with the fan-out: see Bench._workers)",
    )  # fmt: skip
    p.add_argument(
        "--only", choices=("pair", "fanout", "rss"), default=None,
        help="run only the pair measures, only the intention fan-out, or only the RSS of"
        " fresh proxies (idle, then holding --open connections)",
    )  # fmt: skip
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait for a quiet machine")
    p.add_argument("--json", nargs="?", const="-", default=None, help="JSON to PATH (or stdout)")
    args = p.parse_args()
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # --open sockets
    if args.quick:
        args.rounds, args.seconds, args.bulk_bytes, args.fanout = 1, 2.0, 128 << 20, 0
    res = run(args)
    write_output(res, report, args.json, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
