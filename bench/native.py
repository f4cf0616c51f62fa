#!/usr/bin/env python3
"""The native pair of ``bench/proxy.py``: two processes that are Connect services themselves,
with ``trellis.connect`` and no sidecar.

* ``native.py server URL NAME``: ``Service(NAME)``, a TCP listener on 127.0.0.1 whose
  connections are wrapped with ``server_ssl_context()`` and decided by ``authorize()``, and an
  echo for allowed peers, one thread per connection (a sync app, as a threaded or gunicorn-sync
  server is). Prints ``port P`` once it can serve; ``bench/proxy.py`` registers it as
  Connect-native at that port.
* ``native.py client URL NAME DEST``: ``Service(NAME)``, and a load generator whose every
  connection is ``Service.connect(DEST)`` (instance choice, mutual TLS, the whole SPIFFE ID of
  the server checked). It prints ``control P`` and takes one command per connection to that
  control port, answering one line in ``bench/tcpload.c``'s format:

  - ``rr CONC SECONDS SIZE``: CONC connections, each a loop of a SIZE-byte request and its
    echo; ``requests seconds p50_us p99_us failures``;
  - ``conn CONC SECONDS SIZE``: CONC loops of connect, SIZE bytes each way, close (a full
    mutual-TLS handshake each: the SDK resumes no session); ``connections seconds p50_us
    p99_us failures``;
  - ``probe``: one connection and echo; ``ok`` or the error.

Unlike the sidecar and HAProxy rows, where the load comes from ``tcpload`` (C) and the proxies
only relay, here the load generator *is* the native client: its CPU is the app's own TLS and
the Python loop that drives it, counted in the client's CPU figures. That is the point of the
row: what an app pays for Connect in its own process, against what two relays cost.

Both bind 127.0.0.1 only; every load is bounded in time; both exit on SIGTERM (the benchmark
stops them by PID).
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trellis.connect import ConnectError, Service  # noqa: E402


def _say(line: str) -> None:
    print(line, flush=True)


def _read_exactly(sock: ssl.SSLSocket, n: int) -> bool:
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return False
        got += len(chunk)
    return True


# -- the server ---------------------------------------------------------------------------------


def serve(url: str, name: str) -> None:
    svc = Service(name, address=url)
    svc.ready(timeout=60)
    ctx = svc.server_ssl_context()
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)

    def one(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with ctx.wrap_socket(raw, server_side=True) as conn:
                if not svc.authorize(conn).allowed:
                    return
                while data := conn.recv(65536):
                    conn.sendall(data)
        except (OSError, ssl.SSLError):
            pass  # a client gone mid-conversation (the end of a load step)
        finally:
            raw.close()

    _say(f"port {listener.getsockname()[1]}")
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=one, args=(raw,), daemon=True).start()


# -- the client ---------------------------------------------------------------------------------


def _pcts(lat: list[float]) -> tuple[float, float]:
    lat.sort()
    if not lat:
        return 0.0, 0.0
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def _dial(svc: Service, dest: str) -> ssl.SSLSocket:
    sock = svc.connect(dest, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    return sock


def load(svc: Service, dest: str, mode: str, conc: int, seconds: float, size: int) -> str:
    payload = b"r" * size
    lats: list[list[float]] = [[] for _ in range(conc)]
    fails = [0] * conc
    start = threading.Barrier(conc + 1)
    socks = [_dial(svc, dest) for _ in range(conc)] if mode == "rr" else []
    end = [0.0]

    def rr(i: int) -> None:
        sock, lat = socks[i], lats[i]
        start.wait()
        try:
            while (t := time.perf_counter()) < end[0]:
                sock.sendall(payload)
                if not _read_exactly(sock, size):
                    fails[i] += 1
                    return
                lat.append((time.perf_counter() - t) * 1e6)
        except OSError:
            fails[i] += 1
        finally:
            sock.close()

    def conn(i: int) -> None:
        lat = lats[i]
        start.wait()
        while (t := time.perf_counter()) < end[0]:
            try:
                with _dial(svc, dest) as sock:
                    sock.sendall(payload)
                    ok = _read_exactly(sock, size)
            except (OSError, ConnectError, TimeoutError):
                ok = False
            if ok:
                lat.append((time.perf_counter() - t) * 1e6)
            else:
                fails[i] += 1

    threads = [
        threading.Thread(target=rr if mode == "rr" else conn, args=(i,)) for i in range(conc)
    ]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    end[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    every = [x for lat in lats for x in lat]
    p50, p99 = _pcts(every)
    return f"{len(every)} {elapsed:.6f} {p50:.1f} {p99:.1f} {sum(fails)}"


def client(url: str, name: str, dest: str) -> None:
    svc = Service(name, address=url)
    svc.ready(timeout=60)
    control = socket.create_server(("127.0.0.1", 0))
    _say(f"control {control.getsockname()[1]}")
    while True:
        c, _ = control.accept()
        with c, c.makefile("rw") as f:
            words = f.readline().split()
            try:
                if words == ["probe"]:
                    with _dial(svc, dest) as sock:
                        sock.sendall(b"ping")
                        answer = "ok" if _read_exactly(sock, 4) else "closed"
                elif len(words) == 4 and words[0] in ("rr", "conn"):
                    mode, conc, secs, size = words
                    answer = load(svc, dest, mode, int(conc), float(secs), int(size))
                else:
                    answer = "error " + json.dumps(words)
            except (OSError, ConnectError, TimeoutError) as e:
                answer = f"error {e}"
            f.write(answer + "\n")


def main() -> int:
    # SIGTERM ends the process at once (daemon threads and all); the Services' follower
    # threads are daemons too, and their blocking queries die with the process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    role, *args = sys.argv[1:]
    if role == "server" and len(args) == 2:
        serve(*args)
    elif role == "client" and len(args) == 3:
        client(*args)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
