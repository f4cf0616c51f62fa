#!/usr/bin/env python3
"""Authorization benchmark: decisions per second of ``trellis.proxy.authz.IntentionSet.decide``.

The sidecar decides every inbound connection from its cached intentions, so the decision must
not get slower as the mesh grows. This script builds three sets, of 10, 1,000 and 100,000
intentions: the same few intentions that the queries hit, plus filler intentions between
random, realistic service names that no query matches. It times ``decide`` on each path:

* ``exact``: ``web => db`` decides (precedence 9, the first probe);
* ``*->exact``: ``* => cache`` decides (8, the second probe);
* ``exact->*``: ``prometheus => *`` decides (6, the third probe);
* ``default``: nothing matches and the default decides (all four probes miss; a ``* => *``
  intention would cost the same, being the fourth probe);
* ``mixed``: the four paths in turn, with a different source name on most queries.

Before timing, every query's decision is checked to be the path its column names, so a column
cannot silently measure something else. Each cell is the best of several runs of N decisions
(a plain Python loop calling ``decide``: the loop's own cost is included and reported apart).

With ``--http-addr URL`` of a running Trellis server (127.0.0.1 only), it also measures
``POST /v1/agent/connect/authorize`` (body ``{"Target": "db", "ClientCertURI":
"spiffe://<td>/ns/default/dc/dc1/svc/web"}``, the trust domain read from
``GET /v1/connect/ca/roots``) over sequential keep-alive requests with httpx, and reports the
p50/p99 latency. If the endpoint answers 404 it says so and skips that part.

Usage::

    .venv/bin/python bench/authz.py                  # full run (about 15 seconds)
    .venv/bin/python bench/authz.py --quick          # short run (a few seconds)
    .venv/bin/python bench/authz.py --json out.json  # also write the results as JSON
    .venv/bin/python bench/authz.py --json           # print JSON instead of the table
    .venv/bin/python bench/authz.py --http-addr http://127.0.0.1:8500 [--token SECRET]

This is not a test: it asserts nothing, but it says whether the cost stayed flat (the
100,000-intention set within 1.5x of the 10-intention one on every path).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from report import table, write_output  # noqa: E402

from trellis.proxy.authz import ALLOW, DENY, Intention, IntentionSet  # noqa: E402

SIZES = (10, 1_000, 100_000)
FLAT_RATIO = 1.5
SEED = 20210713  # fixed, so that every run builds the same sets

# The intentions the queries hit, present in every set.
BASE = [
    Intention("web", "db", ALLOW, description="the app reads its database"),
    Intention("*", "cache", DENY, description="nobody talks to the cache by default"),
    Intention("prometheus", "*", ALLOW, description="scraping reaches everything"),
    Intention("web", "cache", ALLOW),
    Intention("billing", "db", DENY),
]
# column -> (how the decision must look, queries)
PATHS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "exact": ("web => db (allow)", [("web", "db")]),
    "*->exact": ("* => cache (deny)", [("api", "cache")]),
    "exact->*": ("prometheus => * (allow)", [("prometheus", "payments")]),
    "default": ("", [("api", "payments")]),
}

_TEAMS = "payments billing orders users search catalog checkout ledger auth notify".split()
_ROLES = "api worker db cache gateway frontend backend indexer scheduler exporter".split()
_ENVS = ["", "-eu", "-us", "-canary", "-v2"]


def log(msg: str) -> None:
    print(f"[bench-authz {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def realistic_names(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    """``orders-worker-eu-17``-style names, distinct, none in ``avoid``."""
    out: set[str] = set()
    while len(out) < n:
        name = f"{rng.choice(_TEAMS)}-{rng.choice(_ROLES)}{rng.choice(_ENVS)}-{rng.randrange(1000)}"
        if name not in avoid:
            out.add(name)
    return sorted(out)


def query_names() -> set[str]:
    return {n for _, qs in PATHS.values() for q in qs for n in q} | {"*"}


def build_set(size: int, rng: random.Random) -> IntentionSet:
    """BASE plus ``size - len(BASE)`` filler intentions that match none of the queries."""
    n = size - len(BASE)
    names = realistic_names(rng, max(2, int(n**0.5) * 2 + 2), query_names())
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < n:
        src, dst = rng.choice(names), rng.choice(names)
        if src != dst:
            pairs.add((src, dst))
    filler = [Intention(s, d, rng.choice((ALLOW, DENY))) for s, d in sorted(pairs)]
    return IntentionSet(BASE + filler)


def check_paths(s: IntentionSet, queries: dict[str, list[tuple[str, str]]]) -> None:
    """Refuse to time a column whose queries do not take the path it names ("" = default)."""
    for col, qs in queries.items():
        want = {PATHS[col][0]} if col in PATHS else {label for label, _ in PATHS.values()}
        for src, dst in qs:
            d = s.decide(src, dst, default_allow=False)
            got = d.intention.label() if d.intention is not None else ""
            if got not in want:
                raise SystemExit(f"bench bug: {col} query {src}->{dst} decided by {got!r}")


def make_queries(rng: random.Random, n: int) -> dict[str, list[tuple[str, str]]]:
    """n queries per column; sources vary where the path allows it (new strings, new hashes)."""
    strangers = realistic_names(rng, 500, query_names())
    cols: dict[str, list[tuple[str, str]]] = {}
    for col, (_, qs) in PATHS.items():
        cols[col] = (qs * (n // len(qs) + 1))[:n]
    # In the * -> exact and default paths any unknown source works: vary it.
    cols["*->exact"] = [(strangers[k % len(strangers)], "cache") for k in range(n)]
    cols["default"] = [(strangers[k % len(strangers)], "payments") for k in range(n)]
    mixed = [cols[c][k] for k in range(n // 4 + 1) for c in PATHS]
    cols["mixed"] = mixed[:n]
    return cols


def best_of(fn: Callable[[], float], runs: int) -> float:
    return min(fn() for _ in range(runs))


def time_decide(s: IntentionSet, qs: list[tuple[str, str]]) -> float:
    decide = s.decide
    t0 = time.perf_counter()
    for src, dst in qs:
        decide(src, dst, default_allow=False)
    return time.perf_counter() - t0


def time_loop(qs: list[tuple[str, str]]) -> float:
    """The same loop with a trivial call: what the loop and the call cost by themselves."""

    def noop(src: str, dst: str, *, default_allow: bool) -> None:
        return None

    t0 = time.perf_counter()
    for src, dst in qs:
        noop(src, dst, default_allow=False)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# HTTP: POST /v1/agent/connect/authorize on a running server
# --------------------------------------------------------------------------------------------


def check_local(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname != "127.0.0.1":
        raise SystemExit(f"--http-addr must be an http(s)://127.0.0.1:PORT URL, not {url!r}")
    return url.rstrip("/")


def http_bench(addr: str, token: str | None, n: int) -> dict[str, Any]:
    import httpx

    headers = {"X-Consul-Token": token} if token else {}
    out: dict[str, Any] = {"addr": addr, "requests": 0}
    with httpx.Client(base_url=addr, headers=headers, timeout=10.0) as client:
        try:
            roots = client.get("/v1/connect/ca/roots")
        except httpx.HTTPError as e:
            out["skipped"] = f"cannot reach {addr}: {e}"
            return out
        td = roots.json().get("TrustDomain") if roots.status_code == 200 else None
        if not td:
            out["skipped"] = f"GET /v1/connect/ca/roots: {roots.status_code}, no TrustDomain"
            return out
        body = {"Target": "db", "ClientCertURI": f"spiffe://{td}/ns/default/dc/dc1/svc/web"}
        out["body"] = body
        first = client.post("/v1/agent/connect/authorize", json=body)
        if first.status_code == 404:
            out["skipped"] = "POST /v1/agent/connect/authorize answered 404 (not there yet)"
            return out
        out["first_response"] = {"status": first.status_code, "body": first.text[:300]}
        for _ in range(min(100, n // 10)):  # warm-up, unmeasured
            client.post("/v1/agent/connect/authorize", json=body)
        lat: list[float] = []
        statuses: dict[str, int] = {}
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post("/v1/agent/connect/authorize", json=body)
            lat.append(time.perf_counter() - t0)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
    lat.sort()
    out.update(
        requests=n,
        statuses=statuses,
        p50_ms=round(statistics.median(lat) * 1e3, 3),
        p99_ms=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3),
        max_ms=round(lat[-1] * 1e3, 3),
        per_s=round(n / sum(lat), 1),
    )
    return out


# --------------------------------------------------------------------------------------------
# Run and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    decisions: int
    runs: int
    http_addr: str | None
    token: str | None
    http_requests: int
    json_out: str | None


def run(cfg: Config) -> dict[str, Any]:
    rng = random.Random(SEED)
    queries = make_queries(rng, cfg.decisions)
    loop_s = best_of(lambda: time_loop(queries["mixed"]), cfg.runs)
    sets: list[IntentionSet] = []
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        t0 = time.perf_counter()
        s = build_set(size, rng)
        build_s = time.perf_counter() - t0
        check_paths(s, queries)
        sets.append(s)
        rows.append({"intentions": len(s), "build_s": round(build_s, 3), "paths": {}})
        log(f"{len(s):>7} intentions: built and checked in {build_s:.2f} s")
    # Runs are interleaved (every set, every column, then again), so that a drift of the
    # machine (clock, other processes) hits all sizes alike; the best run of each cell counts.
    best: dict[tuple[int, str], float] = {}
    for _ in range(cfg.runs):
        for col, qs in queries.items():
            for k, s in enumerate(sets):
                t = time_decide(s, qs)
                best[k, col] = min(t, best.get((k, col), t))
    for k, row in enumerate(rows):
        for col, qs in queries.items():
            row["paths"][col] = {
                "decisions_per_s": round(len(qs) / best[k, col]),
                "ns_per_decision": round(best[k, col] / len(qs) * 1e9, 1),
            }
    log("timed")
    base = rows[0]["paths"]
    worst = max(
        r["paths"][c]["ns_per_decision"] / base[c]["ns_per_decision"] for r in rows for c in base
    )
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {"python": platform.python_version(), "os": platform.platform()},
        "config": {"decisions_per_cell": cfg.decisions, "runs_per_cell": cfg.runs},
        "loop_ns_per_call": round(loop_s / cfg.decisions * 1e9, 1),
        "rows": rows,
        "flat": {
            "worst_ratio_vs_10": round(worst, 2),
            "target": FLAT_RATIO,
            "met": worst < FLAT_RATIO,
        },
    }
    if cfg.http_addr:
        log(f"HTTP: {cfg.http_requests} sequential requests to {cfg.http_addr}")
        res["http"] = http_bench(cfg.http_addr, cfg.token, cfg.http_requests)
    return res


def report(res: dict[str, Any]) -> str:
    cols = list(res["rows"][0]["paths"])
    c = res["config"]
    parts = [
        "Trellis authorization benchmark: IntentionSet.decide, decisions per second",
        f"  date: {res['date']}   Python {res['machine']['python']}, {res['machine']['os']}",
        f"  each cell: best of {c['runs_per_cell']} runs of {c['decisions_per_cell']} decisions"
        f" (ns/decision in brackets); the loop and a no-op call alone cost"
        f" {res['loop_ns_per_call']} ns",
        "",
        table(
            [
                [f"{r['intentions']:,}", f"{r['build_s']:.2f}"]
                + [
                    f"{r['paths'][k]['decisions_per_s'] / 1e6:.2f} M"
                    f" ({r['paths'][k]['ns_per_decision']:.0f})"
                    for k in cols
                ]
                for r in res["rows"]
            ],
            ["intentions", "build s", *cols],
        ),
        "",
        f"Flat: the worst cell is {res['flat']['worst_ratio_vs_10']} x the 10-intention one"
        f" (target < {res['flat']['target']}) -> {'MET' if res['flat']['met'] else 'MISSED'}",
    ]
    h = res.get("http")
    if h is not None:
        if "skipped" in h:
            parts.append(f"HTTP {h['addr']}: skipped: {h['skipped']}")
        else:
            parts.append(
                f"HTTP POST /v1/agent/connect/authorize at {h['addr']}: {h['requests']} sequential"
                f" keep-alive requests, statuses {h['statuses']}: p50 {h['p50_ms']} ms,"
                f" p99 {h['p99_ms']} ms, max {h['max_ms']} ms ({h['per_s']}/s);"
                f" first response {h['first_response']['status']} {h['first_response']['body']}"
            )
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description="Benchmark IntentionSet.decide (and the HTTP API).")
    p.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH (without PATH: print JSON instead of the table)",
    )
    p.add_argument("--decisions", type=int, help="decisions per cell (default 200000, quick 50000)")
    p.add_argument("--runs", type=int, help="runs per cell, the best counts (default 5, quick 3)")
    p.add_argument("--http-addr", metavar="URL", help="a running Trellis server on 127.0.0.1")
    p.add_argument("--token", help="ACL token for --http-addr (sent as X-Consul-Token)")
    p.add_argument(
        "--http-requests", type=int, help="measured HTTP requests (default 2000, quick 500)"
    )
    a = p.parse_args(argv)
    decisions = a.decisions or (50_000 if a.quick else 200_000)
    if not 1_000 <= decisions <= 5_000_000:
        p.error("--decisions must be in 1000..5000000")
    runs = a.runs or (3 if a.quick else 5)
    if not 1 <= runs <= 20:
        p.error("--runs must be in 1..20")
    http_requests = a.http_requests or (500 if a.quick else 2000)
    if not 10 <= http_requests <= 100_000:
        p.error("--http-requests must be in 10..100000")
    return Config(
        quick=a.quick,
        decisions=decisions,
        runs=runs,
        http_addr=check_local(a.http_addr) if a.http_addr else None,
        token=a.token,
        http_requests=http_requests,
        json_out=a.json,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    res = run(cfg)
    write_output(res, report, cfg.json_out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
