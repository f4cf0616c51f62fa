#!/usr/bin/env python3
"""What ``import trellis.connect`` costs an app: time and resident memory, in fresh interpreters.

For each of ``--runs`` fresh interpreters (this venv's Python, run from a temp dir):

* the wall time of the import statement (``time.perf_counter`` around it);
* ``-X importtime``: the cumulative microseconds the interpreter itself reports for the
  ``trellis.connect`` line (its own bookkeeping makes it a little higher than the wall time),
  and the sum of every line's own time (the whole start, ``site`` included);
* the peak resident set (``VmHWM``) after the import; beside it, the same for a bare
  interpreter and for the control plane's Flask app (``trellis.api.app``), for scale.

Medians and minimums are reported. A benchmark, not a test (tests/test_connect_sdk.py checks
which modules the import loads); it starts nothing but interpreters and asserts nothing.

    .venv/bin/python bench/connect_import.py            # 10 runs, a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from report import fmt, table

PROBE = (
    "import json, time\n"
    "t = time.perf_counter()\n"
    "{stmt}\n"
    "t = time.perf_counter() - t\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "print(json.dumps({{'ms': t * 1000, 'hwm_kb': int(hwm.split()[1])}}))\n"
)


def probe(stmt: str, cwd: str) -> dict[str, float]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(stmt=stmt)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=True,
    )
    out: dict[str, float] = json.loads(r.stdout)
    return out


def importtime(cwd: str) -> dict[str, float]:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import trellis.connect"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=True,
    )
    own_sum, connect = 0, 0
    for line in r.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        if not own.strip().isdigit():
            continue
        own_sum += int(own)
        if name.strip() == "trellis.connect":
            connect = int(cumulative)
    return {"connect_ms": connect / 1000, "all_ms": own_sum / 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="fresh interpreters per figure (10)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON instead")
    args = p.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"bare": [], "connect": [], "app": [], "xit": []}
    with tempfile.TemporaryDirectory(prefix="trellis-bench-import-") as cwd:
        for _ in range(args.runs):  # interleaved, so a busy moment spreads over all of them
            rows["bare"].append(probe("pass", cwd))
            rows["connect"].append(probe("import trellis.connect", cwd))
            rows["app"].append(probe("import trellis.api.app", cwd))
            rows["xit"].append(importtime(cwd))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    def low(name: str, key: str) -> float:
        return min(r[key] for r in rows[name])

    print(f"import cost, {args.runs} fresh interpreters each (median / min)")
    print(
        table(
            [
                [
                    what,
                    f"{fmt(med(name, 'ms'))} / {fmt(low(name, 'ms'))}",
                    f"{fmt(med(name, 'hwm_kb') / 1024)} / {fmt(low(name, 'hwm_kb') / 1024)}",
                ]
                for what, name in (
                    ("bare interpreter", "bare"),
                    ("import trellis.connect", "connect"),
                    ("import trellis.api.app", "app"),
                )
            ],
            ["", "import ms (perf_counter)", "peak RSS MB (VmHWM)"],
        )
    )
    print(
        "-X importtime: trellis.connect cumulative"
        f" {fmt(med('xit', 'connect_ms'))} / {fmt(low('xit', 'connect_ms'))} ms;"
        f" every line's own time summed (the whole start)"
        f" {fmt(med('xit', 'all_ms'))} / {fmt(low('xit', 'all_ms'))} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
