#!/usr/bin/env python3
"""What the node agent's hop costs one client: K/V GET and PUT at concurrency 1, 400 requests
each after 50 of warm-up, through `trellis dev`'s agent and straight to its server, twice,
interleaved.

    .venv/bin/python bench/agent_hop.py

Not a test: it checks only that every request was a 200. It starts `trellis dev` on free
loopback ports (-http-port 0, no DNS) and stops it with SIGINT.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

TRELLIS = str(Path(sys.executable).with_name("trellis"))


def measure(fn: Callable[[], httpx.Response], n: int = 400) -> tuple[float, float]:
    for _ in range(50):
        fn()
    took = []
    for _ in range(n):
        t = time.perf_counter()
        r = fn()
        took.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    took.sort()
    return took[n // 2] * 1e3, took[n * 9 // 10] * 1e3


def main() -> int:
    dev = subprocess.Popen(
        [TRELLIS, "dev", "-http-port", "0", "-dns-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert dev.stdout is not None
    agent = server = 0
    for line in dev.stdout:
        if m := re.search(r"HTTP API:\s+http://127\.0\.0\.1:(\d+)", line):
            agent = int(m.group(1))
        if m := re.search(r"Server API:\s+http://127\.0\.0\.1:(\d+)", line):
            server = int(m.group(1))
        if "agent running" in line:
            break
    try:
        for label, port in (("agent", agent), ("server", server)) * 2:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                c.put("/v1/kv/k", content=b"v")
                get = measure(lambda c=c: c.get("/v1/kv/k"))
                put = measure(lambda c=c: c.put("/v1/kv/k", content=b"v"))
            print(
                f"{label:6}  GET p50 {get[0]:.2f} ms p90 {get[1]:.2f} ms"
                f"   PUT p50 {put[0]:.2f} ms p90 {put[1]:.2f} ms",
                flush=True,
            )
    finally:
        dev.send_signal(signal.SIGINT)
        dev.communicate(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
