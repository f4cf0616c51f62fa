"""py-consul's own test suite, unchanged, against Trellis (issue 15's first check).

The Makefile downloads the source distribution of py-consul (PY_CONSUL_VERSION; the wheel
carries no tests) into build/py-consul/. This test unpacks a fresh copy of it, so no test body
can have been edited, and runs its tests in a pytest subprocess with the fixture plugin of
tests/pyconsul_suite/ (a ``trellis server`` and its dev node agent where py-consul starts a
Consul container). Its outcome is then held against tests/pyconsul_suite/expected.toml:
the tests listed there as cannot-apply are not run, those listed as not-yet must fail
(``xfail(strict=True)``), and every other test must pass. Anything else fails this test,
with the subprocess's report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "pyconsul_suite"
#: The one place the version is pinned: the Makefile, which downloads it.
PY_CONSUL_VERSION = re.search(
    r"^PY_CONSUL_VERSION = (\S+)$", (ROOT / "Makefile").read_text(), re.M
).group(1)  # type: ignore[union-attr]
#: Far above the run's few minutes: only a hung run meets it.
TIMEOUT = 900
SDIST = ROOT / "build" / "py-consul" / f"py_consul-{PY_CONSUL_VERSION}.tar.gz"


def _expected() -> tuple[set[str], set[str]]:
    """The node IDs of expected.toml's two lists (the plugin reads the reasons too)."""
    raw = tomllib.loads((SUITE / "expected.toml").read_text())
    return tuple(  # type: ignore[return-value]
        {nodeid for group in raw.get(part, {}).values() for nodeid in group}
        for part in ("cannot_apply", "not_yet")
    )


def test_pyconsul_suite_passes_against_trellis(tmp_path):
    assert SDIST.is_file(), f"{SDIST} is missing: run make"
    with tarfile.open(SDIST) as tar:
        tar.extractall(tmp_path, filter="data")
    src = tmp_path / f"py_consul-{PY_CONSUL_VERSION}"
    assert (src / "tests" / "conftest.py").is_file(), "the sdist carries no tests"
    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_TOKEN", "PYTHONPATH")}
    env["PYTHONPATH"] = str(SUITE)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pytest", "-p", "trellis_pyconsul"),
            # Our ini, not the sdist's (its addopts need pytest-cov); the sdist's root conftest
            # (Docker) stays out below --confcutdir.
            *("-c", str(SUITE / "pytest.ini"), "--rootdir", str(src)),
            *("--confcutdir", str(src / "tests"), "-p", "no:cacheprovider"),
            *("-q", "-rfE", "--trellis-results", str(results), "tests"),
        ],
        cwd=src,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except BaseException:
        # SIGINT, not SIGKILL: pytest then runs the fixtures' teardown, which stops every
        # Trellis it started (each in a session of its own, out of reach of a group kill).
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    report = out[-20000:]
    assert results.is_file(), report
    got: dict[str, str] = json.loads(results.read_text())
    cannot, not_yet = _expected()
    unexpected = {
        nodeid: outcome
        for nodeid, outcome in got.items()
        if outcome
        != ("cannot apply" if nodeid in cannot else "xfailed" if nodeid in not_yet else "passed")
    }
    assert not unexpected, f"unexpected outcomes: {json.dumps(unexpected, indent=1)}\n{report}"
    assert set(got) >= set(cannot) | set(not_yet), report
    assert proc.returncode == 0, report
    passed = sum(1 for o in got.values() if o == "passed")
    print(
        f"py-consul {PY_CONSUL_VERSION}: {passed} passed, {len(cannot)} cannot apply, "
        f"{len(not_yet)} not yet"
    )
