"""The decisions of the agent's health checks (trellis.proxy.agent.checkrules), as tables."""

from __future__ import annotations

import math

import pytest

from trellis.proxy.agent import checkrules as rules
from trellis.proxy.agent.checkrules import AliasCheck, Report
from trellis.proxy.agent.ports import CRITICAL, PASSING, WARNING, CheckDef, CheckResult


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (200, PASSING),
        (204, PASSING),
        (299, PASSING),
        (429, WARNING),
        (199, CRITICAL),
        (300, CRITICAL),
        (302, CRITICAL),
        (404, CRITICAL),
        (428, CRITICAL),
        (500, CRITICAL),
        (503, CRITICAL),
    ],
)
def test_http_status(code, status):
    assert rules.http_status(code) == status


def test_http_output_is_the_status_line_and_the_first_4_kib_of_the_body_trimmed():
    r = rules.http_result("GET", "http://a/h", 200, "OK", b"  " + b"x" * 5000)
    assert r == CheckResult(PASSING, "HTTP GET http://a/h: 200 OK Output: " + "x" * 4094)
    assert rules.http_result("GET", "http://a/h", 500, "Oops", b"") == CheckResult(
        CRITICAL, "HTTP GET http://a/h: 500 Oops"
    )
    # Undecodable bytes do not break the output.
    assert rules.http_result("GET", "u", 200, "OK", b"\xff ok").output.endswith("\ufffd ok")


def test_http_failure_is_critical_with_the_reason():
    assert rules.http_failure("GET", "http://a", "Connection refused") == CheckResult(
        CRITICAL, "HTTP GET http://a: Connection refused"
    )


@pytest.mark.parametrize(
    ("method", "url", "code", "location", "hops", "expected"),
    [
        # Not a redirect: the answer stands.
        ("GET", "http://a:8/x", 200, None, 0, None),
        ("GET", "http://a:8/x", 302, None, 0, None),
        # Same origin: followed; relative targets resolved against the current URL.
        ("GET", "http://a:8/x", 302, "/y", 0, ("http://a:8/y", "GET")),
        ("GET", "http://a:8/x/", 307, "z", 3, ("http://a:8/x/z", "GET")),
        ("GET", "http://A:80/x", 301, "http://a/y", 0, ("http://a/y", "GET")),
        ("POST", "http://a/x", 302, "/y", 0, ("http://a/y", "GET")),
        ("POST", "http://a/x", 307, "/y", 0, ("http://a/y", "POST")),
        ("PUT", "http://a/x", 303, "/y", 0, ("http://a/y", "GET")),
        ("HEAD", "http://a/x", 303, "/y", 0, ("http://a/y", "HEAD")),
        # Another host, port or scheme: not followed (CVE-2022-29153).
        ("GET", "http://a/x", 302, "http://b/x", 0, "another origin"),
        ("GET", "http://a/x", 302, "http://a:81/x", 0, "another origin"),
        ("GET", "http://a/x", 302, "https://a/x", 0, "another origin"),
        ("GET", "https://a/x", 302, "http://a/x", 0, "another origin"),
        ("GET", "http://a/x", 302, "//169.254.169.254/latest", 0, "another origin"),
        ("GET", "http://a/x", 302, "http://a:bad/x", 0, "another origin"),
        # The tenth redirect is the last one followed.
        ("GET", "http://a/x", 302, "/y", 9, ("http://a/y", "GET")),
        ("GET", "http://a/x", 302, "/y", 10, "stopped after 10"),
    ],
)
def test_redirect(method, url, code, location, hops, expected):
    got = rules.redirect(method, url, code, location, hops)
    if expected is None:
        assert got is None
    elif isinstance(expected, tuple):
        assert got is not None and (got.target, got.method) == expected
    else:
        assert got is not None and got.target is None and expected in got.why


def test_tcp_result():
    assert rules.tcp_result("h:1", None) == CheckResult(PASSING, "TCP connect h:1: Success")
    assert rules.tcp_result("h:1", "refused") == CheckResult(CRITICAL, "TCP connect h:1: refused")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("h:0", None),
        ("h:65536", None),
        ("h", None),
        (":80", None),
        ("h:x", None),
        ("", None),
    ],
)
def test_host_port(address, expected):
    if expected is None:
        with pytest.raises(ValueError, match="HOST:PORT"):
            rules.host_port(address)
    else:
        assert rules.host_port(address) == expected


@pytest.mark.parametrize(
    ("code", "status"), [(0, PASSING), (1, WARNING), (2, CRITICAL), (127, CRITICAL), (-9, CRITICAL)]
)
def test_exit_status(code, status):
    assert rules.exit_status(code) == status
    assert rules.script_result(code, b" out\n").status == status
    assert rules.script_result(code, b" out\n").output == "out"


def test_a_script_killed_at_its_timeout_is_critical_and_says_so():
    r = rules.script_result(None, b"partial", timed_out=True, timeout=2.5)
    assert r == CheckResult(CRITICAL, "Timed out (2.5s) running check; killed\npartial")
    assert rules.script_result(None, b"", timed_out=True, timeout=3).output.startswith(
        "Timed out (3s)"
    )


def test_ttl_expired_keeps_the_last_output():
    assert rules.ttl_expired("") == CheckResult(CRITICAL, "TTL expired")
    assert rules.ttl_expired("ok") == CheckResult(CRITICAL, "TTL expired (last output: ok)")


def _c(status, service="web", node="n1", cid=None, output=""):
    return AliasCheck(
        cid or f"{service}-{status}", f"{service} {status}", status, output, service, node
    )


@pytest.mark.parametrize(
    ("checks", "status", "output"),
    [
        (None, CRITICAL, "Service 'web' not found"),
        ([], PASSING, "No checks found."),
        ([_c(PASSING), _c(PASSING, cid="b")], PASSING, "All checks passing."),
        (
            [_c(PASSING), _c(WARNING, output="slow")],
            WARNING,
            "Aliased check 'web warning' warning: slow",
        ),
        (
            [_c(WARNING), _c(CRITICAL, output="down"), _c(PASSING)],
            CRITICAL,
            "'web critical' critical: down",
        ),
        # Another service's checks do not count; the node's own checks do.
        ([_c(PASSING), _c(CRITICAL, service="db")], PASSING, "All checks passing."),
        ([_c(PASSING), _c(CRITICAL, service="")], CRITICAL, "critical"),
        # Checks of another node than the one named do not count.
        ([_c(PASSING), _c(CRITICAL, node="n2")], PASSING, "All checks passing."),
    ],
)
def test_alias_is_the_worst_of_the_service_and_its_node(checks, status, output):
    r = rules.alias_result(checks, service_id="web", node="n1")
    assert r.status == status
    assert output in r.output


def test_alias_of_a_node_is_its_own_checks():
    checks = [_c(PASSING, service=""), _c(CRITICAL, service="web")]
    assert rules.alias_result(checks, service_id="", node="n1").status == PASSING
    assert rules.alias_result(None, service_id="", node="n1") == CheckResult(
        CRITICAL, "Node 'n1' not found"
    )


def test_worst():
    assert rules.worst([]) == PASSING
    assert rules.worst([PASSING, WARNING]) == WARNING
    assert rules.worst([WARNING, CRITICAL, PASSING]) == CRITICAL
    assert rules.worst(["nonsense", PASSING]) == CRITICAL


P, C = CheckResult(PASSING, "a"), CheckResult(CRITICAL, "a")


@pytest.mark.parametrize(
    ("sent", "sent_at", "new", "now", "expected"),
    [
        # Never sent by the runner: the first result differing from the registration goes.
        (None, 0.0, P, 5.0, Report(True)),
        (CheckResult(CRITICAL, ""), -math.inf, CheckResult(CRITICAL, "x"), 5.0, Report(True)),
        # The same result: nothing, ever.
        (P, 0.0, P, 1000.0, Report(False)),
        # A status change: at once, however recent the last send.
        (P, 99.0, C, 100.0, Report(True)),
        (C, 99.0, CheckResult(PASSING, "a"), 100.0, Report(True)),
        # An output-only change: at once if the last send is output_every old, else later.
        (P, 0.0, CheckResult(PASSING, "b"), 300.0, Report(True)),
        (P, 10.0, CheckResult(PASSING, "b"), 100.0, Report(False, 310.0)),
    ],
)
def test_report(sent, sent_at, new, now, expected):
    assert rules.report(sent, sent_at, new, now, 300.0) == expected


def test_report_with_no_output_interval_sends_every_change():
    assert rules.report(P, 99.0, CheckResult(PASSING, "b"), 100.0, 0.0) == Report(True)


def test_critical_since_and_deregister_at():
    assert rules.critical_since(None, CRITICAL, 5.0) == 5.0
    assert rules.critical_since(3.0, CRITICAL, 5.0) == 3.0
    assert rules.critical_since(3.0, WARNING, 5.0) is None
    assert rules.critical_since(None, PASSING, 5.0) is None
    assert rules.deregister_at(3.0, 60.0) == 63.0
    assert rules.deregister_at(3.0, 0.0) is None
    assert rules.deregister_at(None, 60.0) is None


def test_services_to_deregister_once_each_and_never_for_node_checks():
    checks = {
        "a": ("web", 0.0, 60.0),
        "b": ("web", 10.0, 30.0),
        "c": ("db", 0.0, 120.0),
        "d": ("", 0.0, 1.0),
        "e": ("api", None, 1.0),
        "f": ("cache", 0.0, 0.0),
    }
    assert rules.services_to_deregister(checks, 39.0, set()) == []
    assert rules.services_to_deregister(checks, 40.0, set()) == ["web"]
    assert rules.services_to_deregister(checks, 120.0, set()) == ["db", "web"]
    assert rules.services_to_deregister(checks, 120.0, {"web"}) == ["db"]


def test_intervals_have_a_floor_and_the_first_run_is_spread_over_one():
    assert rules.interval_of(CheckDef("c", "c", interval=0.01)) == 1.0
    assert rules.interval_of(CheckDef("c", "c", interval=30)) == 30.0
    assert rules.first_delay(10.0, 0.0) == 0.0
    assert rules.first_delay(10.0, 0.25) == 2.5
    assert rules.first_delay(10.0, 0.999) < 10.0


def _refused(**kw):
    return rules.refusal(CheckDef("c", "c", **kw), enable_script_checks=False)


def test_refusal():
    assert _refused(kind="ttl", ttl=10) is None
    assert "script checks are disabled" in _refused(kind="script", args=("true",))
    assert (
        rules.refusal(CheckDef("c", "c", kind="script", args=("true",)), enable_script_checks=True)
        is None
    )
    assert "needs args" in rules.refusal(
        CheckDef("c", "c", kind="script"), enable_script_checks=True
    )
    assert "unknown check kind" in _refused(kind="grpc")
    assert "initial status" in _refused(kind="ttl", ttl=1, status="ok")
    assert _refused(kind="http", http="https://h:1/x") is None
    assert "http:// or https://" in _refused(kind="http", http="file:///etc/passwd")
    assert "http:// or https://" in _refused(kind="http", http="")
    assert "out of range" in _refused(kind="http", http="http://h:99999/")
    assert "not an HTTP method" in _refused(kind="http", http="http://h/", method="GE T")
    assert "HOST:PORT" in _refused(kind="tcp", tcp="h")
    assert _refused(kind="tcp", tcp="h:1") is None
    assert "ttl above zero" in _refused(kind="ttl")
    assert "ttl above zero" in _refused(kind="ttl", ttl=math.inf)
    assert "alias_service" in _refused(kind="alias")
    assert _refused(kind="alias", alias_node="n2") is None
    assert "timeout above zero" in _refused(kind="tcp", tcp="h:1", timeout=0)
    assert "finite" in _refused(kind="tcp", tcp="h:1", interval=math.nan)
