"""Every test that drives the app in-process runs on SQLite and on PostgreSQL.

The store is where SQLite and PostgreSQL differ (locking, isolation, notifications, types), so
an API test that runs on one of them only can pass without testing the other. The suite is
collected in a child pytest with a small plugin (``tests.store_coverage``) that reports, for
every test using an in-process app fixture, the store each of its instances runs on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.store_coverage import MARK

TESTS = Path(__file__).resolve().parent


def test_every_in_process_api_test_runs_on_both_stores():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tests.store_coverage",
         "-p", "no:cacheprovider", str(TESTS)],
        capture_output=True, text=True, timeout=300, cwd=TESTS.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stores: dict[str, set[str | None]] = defaultdict(set)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            seen = json.loads(line[len(MARK) :])
            stores[seen["test"]].add(seen["store"])
    assert len(stores) > 100, "the plugin saw too few tests: is it still loaded?"
    one_sided = sorted(test for test, kinds in stores.items() if kinds != {"sqlite", "postgresql"})
    assert not one_sided, f"in-process API tests that do not run on both stores: {one_sided}"
