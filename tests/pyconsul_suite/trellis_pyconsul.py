"""A pytest plugin that runs py-consul's own test suite against Trellis instead of Consul.

Theory of operation. py-consul's sdist ships its tests with two conftest files: the one at
the sdist's root starts a ``hashicorp/consul`` Docker container (``agent -dev``) per test and
provides ``consul_instance``, ``acl_consul_instance`` and ``consul_port``; ``tests/conftest.py``
builds ``consul_obj`` and ``acl_consul`` on top of those. tests/test_pyconsul_suite.py runs
pytest on the unpacked sdist with ``--confcutdir`` at its ``tests/`` folder, so the root
conftest (and Docker) is never loaded, and with this plugin, which provides the three fixtures
by starting Trellis: ``tests/conftest.py`` and every test body run as released.

What a test gets is what Consul's conftest gives it: a fresh server of its own per test (the
tests assume an empty store), answering on one HTTP port as a dev agent does. Here that is a
``trellis server`` and, in front of it on the same node, the node agent of ``trellis dev``
(``trellis agent -dev``), each on a free port. The ACL variant's server has
``acl.enabled`` (default policy allow, as Consul's default) and the management token: set by
``acl.tokens.initial_management`` as the Consul fixture does once Trellis's configuration
accepts it, else by bootstrapping (``PUT /v1/acl/bootstrap``), whose SecretID the tests get.

Starting a server and an agent takes about a second, and stopping them gracefully as long;
one after the other, 120 tests would take minutes. So while a test runs, the instances the
next two tests need (known once the tests are collected) are being started in threads, and a
finished test's instance is stopped in a thread too. Every process is started through
tests/support.py's TrellisProcess and ended by its PID (its process group), and the session
does not end before every stop has finished.

``expected.toml`` beside this file lists the tests that cannot apply to Trellis (deselected,
each with the reason) and those Trellis fails today for want of something issue 15 builds
(``xfail(strict=True)``: one that starts passing fails the run until it leaves the list). An
entry that names no test of a collected file is an error, so the lists cannot go stale
silently.
The outcome of every test is written as JSON to ``--trellis-results``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import signal
import sys
import threading
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEPS = ROOT / "build" / "py-consul" / "deps"
# aiohttp and pytest-asyncio (for test_aio.py) live in a directory of their own (the
# Makefile); appended, so that nothing there shadows the environment's own packages.
if str(DEPS) not in sys.path:
    sys.path.append(str(DEPS))
pytest_plugins = ["pytest_asyncio"]
# tests/test_pyconsul_suite.py stops a run that hangs with SIGINT, so that the fixtures'
# teardown stops every Trellis: a run started in the background inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)


def _load_support() -> Any:
    # tests/support.py, under a name of its own: this run's ``tests`` package is py-consul's.
    spec = importlib.util.spec_from_file_location(
        "trellis_test_support", ROOT / "tests" / "support.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


support = _load_support()

#: The Consul release whose behaviour the tests branch on (``should_skip(version, ...)``): the
#: newest of those py-consul 1.8.0's conftest runs against, the behaviour Trellis follows.
CONSUL_VERSION = "1.22.0"

ConsulInstance = collections.namedtuple("ConsulInstance", ["container", "port", "version"])


def _accepts_initial_management() -> bool:
    """Whether Trellis's configuration has ``acl.tokens.initial_management`` (issue 15)."""
    from trellis.api.errors import ConfigError
    from trellis.api.settings import flatten

    try:
        flatten({"acl": {"tokens": {"initial_management": "x"}}})
    except (ConfigError, AttributeError, TypeError):
        return False
    return True


class Instance:
    """One Trellis standing in for one ``consul agent -dev``: a server and its node agent."""

    def __init__(self, base: Path, *, acl: bool) -> None:
        self.base = base
        self.acl = acl
        self.token: str | None = None
        self.procs: list[Any] = []
        self.port = 0

    def start(self) -> Instance:
        config: dict[str, Any] = {}
        if self.acl:
            config["acl"] = {"enabled": True}
            if _accepts_initial_management():
                # A UUID, which any reading of the setting accepts (Consul's fixture: its hex).
                self.token = str(uuid.uuid4())
                config["acl"]["tokens"] = {"initial_management": self.token}
        cfg = self.base / "server.json"
        cfg.write_text(json.dumps(config))
        try:
            server = support.TrellisProcess(
                [
                    *support.server_args(self.base / "server", workers=1, node="trellis-dev"),
                    "-config",
                    str(cfg),
                ]
            )
            self.procs.append(server)
            server.start()
            if self.acl and self.token is None:
                r = httpx.put(server.url + "/v1/acl/bootstrap", timeout=10)
                assert r.status_code == 200, r.text
                self.token = r.json()["SecretID"]
            agent = support.TrellisProcess(
                [
                    *("agent", "-dev", "-node", "trellis-dev", "-server", server.url),
                    *("-http-port", "0", "-data-dir", str(self.base / "agent")),
                    # Consul's fixture sets enable_script_checks.
                    "-enable-script-checks",
                ]
            )
            self.procs.append(agent)
            agent.start()
            self.port = int(agent.url.rsplit(":", 1)[1])
        except BaseException:
            self.stop()
            raise
        return self

    def output(self) -> str:
        return "\n\n".join(f"$ {' '.join(p.args[1:])}\n{p.output()}" for p in self.procs)

    def stop(self) -> None:
        # The agent first, as trellis dev stops them: its leave still finds the server.
        for p in reversed(self.procs):
            p.stop()


class Pool:
    """Instances started ahead of the tests that need them, and stopped behind them.

    ``plan`` is the kind (ACL or not) of each coming test that needs an instance, in the order
    they run; up to ``AHEAD`` of them are being started at any time. A test takes the oldest
    started instance of its kind (or starts one, if the plan was wrong: a test left out)."""

    AHEAD = 2

    def __init__(self, tmp: pytest.TempPathFactory, plan: list[bool]) -> None:
        self.tmp = tmp
        self.lock = threading.Lock()
        self.plan = collections.deque(plan)
        self.ahead: collections.deque[tuple[bool, threading.Thread, list[Any]]] = (
            collections.deque()
        )
        self.threads: list[threading.Thread] = []
        with self.lock:
            self._fill()

    def _started(self, acl: bool) -> tuple[bool, threading.Thread, list[Any]]:
        box: list[Any] = []
        inst = Instance(self.tmp.mktemp("trellis"), acl=acl)

        def run() -> None:
            try:
                box.append(inst.start())
            except BaseException as e:  # handed to the test that takes it
                box.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        return acl, t, box

    def _fill(self) -> None:
        while len(self.ahead) < min(self.AHEAD, len(self.plan)):
            self.ahead.append(self._started(self.plan[len(self.ahead)]))

    def take(self, acl: bool) -> Instance:
        with self.lock:
            if self.plan and self.plan[0] == acl:
                self.plan.popleft()
            pending = next((p for p in self.ahead if p[0] == acl), None)
            if pending is None:
                pending = self._started(acl)
            else:
                self.ahead.remove(pending)
            self._fill()
        # A server stuck starting fails its own start (TrellisProcess's deadlines).
        pending[1].join()
        got = pending[2][0]
        if isinstance(got, BaseException):
            raise got
        return got

    def release(self, inst: Instance) -> None:
        t = threading.Thread(target=inst.stop, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self) -> None:
        # Instances started for tests that never came (a failure, -x) are stopped too.
        with self.lock:
            left = list(self.ahead)
            self.ahead.clear()
            self.plan.clear()
        for _, t, box in left:
            t.join()
            if box and isinstance(box[0], Instance):
                box[0].stop()
        for t in self.threads:
            t.join()


def _kind(item: pytest.Item | None) -> bool | None:
    names = getattr(item, "fixturenames", ())
    if "acl_consul_instance" in names:
        return True
    if "consul_instance" in names:
        return False
    return None


_plan: list[bool] = []
_results: dict[str, str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--trellis-results", default=None, help="write each test's outcome here (JSON)"
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    _plan[:] = [k for k in map(_kind, session.items) if k is not None]


@pytest.fixture(scope="session")
def _trellis_pool(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pool = Pool(tmp_path_factory, _plan)
    try:
        yield pool
    finally:
        pool.close()


def _instance(request: pytest.FixtureRequest, pool: Pool, *, acl: bool) -> Any:
    inst = pool.take(acl)
    try:
        yield inst
    finally:
        rep = getattr(request.node, "_trellis_failed", False)
        if rep:
            request.node.add_report_section("teardown", "trellis", inst.output())
        pool.release(inst)


@pytest.fixture
def consul_instance(request: pytest.FixtureRequest, _trellis_pool: Pool) -> Any:
    for inst in _instance(request, _trellis_pool, acl=False):
        yield ConsulInstance(inst, inst.port, CONSUL_VERSION)


@pytest.fixture
def acl_consul_instance(request: pytest.FixtureRequest, _trellis_pool: Pool) -> Any:
    for inst in _instance(request, _trellis_pool, acl=True):
        yield ConsulInstance(inst, inst.port, CONSUL_VERSION), inst.token


@pytest.fixture
def consul_port(consul_instance: Any) -> Any:
    return consul_instance.port, consul_instance.version


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token() -> None:
    # As py-consul's own conftest: the clients would read it before their own token.
    import os

    os.environ.pop("CONSUL_HTTP_TOKEN", None)


# -- the lists ---------------------------------------------------------------------------


def load_expected() -> tuple[dict[str, str], dict[str, str]]:
    """(cannot apply, not yet): node ID -> reason, from expected.toml. In the file, each list
    is grouped in tables (by what is missing), which are only for people reading it."""
    raw = tomllib.loads((HERE / "expected.toml").read_text())

    def flat(section: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for group, entries in section.items():
            for nodeid, why in entries.items():
                out[nodeid] = f"{group}: {why}"
        return out

    return flat(raw.get("cannot_apply", {})), flat(raw.get("not_yet", {}))


# First, before -k/-m deselect anything: the lists are checked against every collected test.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    cannot, not_yet = load_expected()
    seen = {i.nodeid for i in items}
    # Only in the files collected, so that a run of some files works (the whole run's
    # check, tests/test_pyconsul_suite.py, also fails on an entry in a file gone).
    files = {n.split("::", 1)[0] for n in seen}
    stale = sorted(
        n for n in set(cannot) | set(not_yet) if n not in seen and n.split("::", 1)[0] in files
    )
    both = sorted(set(cannot) & set(not_yet))
    if stale or both:
        raise pytest.UsageError(
            "expected.toml names tests that were not collected: "
            + ", ".join(stale)
            + (" and lists these twice: " + ", ".join(both) if both else "")
        )
    keep, dropped = [], []
    for item in items:
        if item.nodeid in cannot:
            dropped.append(item)
            _results[item.nodeid] = "cannot apply"
            continue
        if item.nodeid in not_yet:
            item.add_marker(
                pytest.mark.xfail(strict=True, reason="not yet: " + not_yet[item.nodeid])
            )
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item._trellis_failed = True  # type: ignore[attr-defined]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    prev = _results.get(report.nodeid)
    if report.when == "call" or report.outcome != "passed":
        if report.failed and "XPASS(strict)" in str(report.longrepr):
            now = "xpassed"
        elif hasattr(report, "wasxfail"):
            now = "xfailed" if report.skipped else "xpassed"
        else:
            now = "error" if report.failed and report.when != "call" else report.outcome
        # The first bad outcome wins (a failed call stays failed whatever the teardown did).
        if prev in (None, "passed", "xfailed"):
            _results[report.nodeid] = now


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--trellis-results")
    if path:
        Path(path).write_text(json.dumps(_results, indent=1, sort_keys=True))
