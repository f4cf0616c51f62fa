"""The decisions of the node agent's health checks, as plain functions. Pure: no I/O, no clock.

``trellis.proxy.agent.checks`` does the probing (sockets, processes, timers) and asks this module
what an observation means: the status an HTTP answer or an exit code gives, the aggregate an
alias check follows, whether a redirect may be followed, whether a new result goes to the
catalog now, later or not at all, and when a service critical for too long is deregistered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from trellis.proxy.agent.ports import CRITICAL, PASSING, WARNING, CheckDef, CheckResult

#: What a check's output keeps: the first 4 KiB (Consul's default ``output_max_size``).
OUTPUT_LIMIT = 4096
#: No check runs more often than this, whatever its definition says (Consul's floor too).
MIN_INTERVAL = 1.0
#: Redirects an HTTP check follows before it gives up (Go's client, which Consul uses, stops
#: after 10 too).
MAX_REDIRECTS = 10
#: Default spacing of output-only changes sent to the catalog (Consul's ``check_update_interval``).
OUTPUT_EVERY = 300.0

KINDS = ("http", "tcp", "ttl", "alias", "script")
STATUSES = (PASSING, WARNING, CRITICAL)
_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2}
_REDIRECTS = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def truncate(data: bytes | str, limit: int = OUTPUT_LIMIT) -> str:
    """The first ``limit`` bytes of ``data`` as text (undecodable bytes replaced), trimmed."""
    raw = data.encode("utf-8", errors="replace") if isinstance(data, str) else data
    return raw[:limit].decode("utf-8", errors="replace").strip()


def worst(statuses: Iterable[str]) -> str:
    """critical > warning > passing; no status at all is passing; an unknown one critical."""
    severity = max((_SEVERITY.get(s, 2) for s in statuses), default=0)
    return STATUSES[severity]


# -- validation -------------------------------------------------------------------------------


def refusal(check: CheckDef, *, enable_script_checks: bool) -> str | None:
    """Why the agent will not run ``check`` (the definition's fault), or None."""
    if check.kind not in KINDS:
        return f"unknown check kind {check.kind!r} (one of {', '.join(KINDS)})"
    if check.status not in STATUSES:
        return f"initial status {check.status!r} is not one of {', '.join(STATUSES)}"
    if check.kind == "script":
        if not enable_script_checks:
            return (
                "script checks are disabled on this agent; start it with "
                "enable_script_checks to run them (only on a node whose HTTP API is not exposed)"
            )
        if not check.args:
            return "a script check needs args (the program and its arguments)"
    if check.kind == "http":
        parts = urlsplit(check.http)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"http must be an http:// or https:// URL, not {check.http!r}"
        try:
            parts.port  # noqa: B018 - a bad port raises here
        except ValueError as e:
            return f"http {check.http!r}: {e}"
        if not check.method or not check.method.isalpha():
            return f"method {check.method!r} is not an HTTP method"
    if check.kind == "tcp":
        try:
            host_port(check.tcp)
        except ValueError as e:
            return str(e)
    if check.kind == "ttl" and not (check.ttl > 0 and math.isfinite(check.ttl)):
        return "a TTL check needs a ttl above zero"
    if check.kind == "alias" and not (check.alias_service or check.alias_node):
        return "an alias check needs alias_service (the service ID it follows) or alias_node"
    if check.kind in ("http", "tcp", "script") and not (
        check.timeout > 0 and math.isfinite(check.timeout) and math.isfinite(check.interval)
    ):
        return "interval and timeout must be finite, and timeout above zero"
    return None


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` split; ValueError (the definition's fault) otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"tcp must be HOST:PORT, not {address!r}")
    return host, int(port)


# -- scheduling -------------------------------------------------------------------------------


def interval_of(check: CheckDef) -> float:
    """The check's interval, raised to :data:`MIN_INTERVAL`."""
    return max(check.interval, MIN_INTERVAL)


def first_delay(interval: float, u: float) -> float:
    """When a new check first runs: a uniform draw ``u`` in [0, 1) spread over one interval,
    so a fleet of checks added together (an agent's start) does not probe in one burst."""
    return min(max(u, 0.0), 1.0) * interval


# -- what an observation means ----------------------------------------------------------------


def http_status(code: int) -> str:
    """2xx passing, 429 (the app asks for less traffic: alive, but loaded) warning, else
    critical."""
    if 200 <= code <= 299:
        return PASSING
    if code == 429:
        return WARNING
    return CRITICAL


def http_result(method: str, url: str, code: int, reason: str, body: bytes) -> CheckResult:
    """The result of an HTTP answer: its status line and the first 4 KiB of its body."""
    head = f"HTTP {method} {url}: " + f"{code} {reason}".strip()
    text = truncate(body)
    return CheckResult(http_status(code), f"{head} Output: {text}" if text else head)


def http_failure(method: str, url: str, why: str) -> CheckResult:
    """No HTTP answer (refused, reset, TLS refused, timed out): critical, with the reason."""
    return CheckResult(CRITICAL, truncate(f"HTTP {method} {url}: {why}"))


@dataclass(frozen=True)
class Redirect:
    """What to do with a 3xx answer: follow ``target`` (with ``method``), or not (``why``)."""

    target: str | None
    method: str
    why: str = ""


def redirect(method: str, url: str, code: int, location: str | None, hops: int) -> Redirect | None:
    """Whether an answer is a redirect an HTTP check follows. None: not a redirect at all.

    Consul follows redirects (up to 10) unless a check sets ``disable_redirects``; following one
    to another host made its checks a server-side request forgery vector (CVE-2022-29153). The
    agent follows a redirect only within the same origin (scheme, host and port), at most
    :data:`MAX_REDIRECTS` times; any other redirect is not followed and its 3xx is the answer
    (critical).
    """
    if code not in _REDIRECTS or not location:
        return None
    target = urljoin(url, location.strip())
    if hops >= MAX_REDIRECTS:
        return Redirect(None, method, f"stopped after {MAX_REDIRECTS} redirects")
    if _origin(target) != _origin(url):
        return Redirect(None, method, f"redirect to another origin not followed: {target}")
    # As browsers and Go do: 303 asks for a GET; 301/302 after a POST become a GET.
    if (code == 303 and method != "HEAD") or (code in (301, 302) and method == "POST"):
        method = "GET"
    return Redirect(target, method)


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def tcp_result(address: str, error: str | None) -> CheckResult:
    """A connection made is passing; refused, unreachable or timed out is critical."""
    if error is None:
        return CheckResult(PASSING, f"TCP connect {address}: Success")
    return CheckResult(CRITICAL, truncate(f"TCP connect {address}: {error}"))


def exit_status(code: int | None) -> str:
    """0 passing, 1 warning, anything else (or killed: None) critical (Consul's convention,
    which is Nagios's)."""
    if code == 0:
        return PASSING
    if code == 1:
        return WARNING
    return CRITICAL


def script_result(
    code: int | None, output: bytes, *, timed_out: bool = False, timeout: float = 0.0
) -> CheckResult:
    """The result of a script: its exit code's status; output = stdout and stderr, first 4 KiB."""
    if timed_out:
        text = truncate(output)
        note = f"Timed out ({timeout:g}s) running check; killed"
        return CheckResult(CRITICAL, f"{note}\n{text}" if text else note)
    return CheckResult(exit_status(code), truncate(output))


def ttl_expired(last_output: str) -> CheckResult:
    """A TTL check not updated in time is critical; the last output sent is kept after it."""
    if last_output:
        return CheckResult(CRITICAL, truncate(f"TTL expired (last output: {last_output})"))
    return CheckResult(CRITICAL, "TTL expired")


@dataclass(frozen=True)
class AliasCheck:
    """One check of the node or service an alias check follows."""

    check_id: str
    name: str
    status: str
    output: str = ""
    service_id: str = ""  # "" = a node-level check
    node: str = ""


def alias_result(
    checks: Sequence[AliasCheck] | None, *, service_id: str, node: str = ""
) -> CheckResult:
    """The health of ``service_id`` on its node: the worst of the service's checks and of its
    node's own checks (a service on a failing node is failing), critical > warning > passing.
    With ``service_id`` "" it is the node's health (its own checks).

    ``checks`` None means the service (or node) is not registered: critical. A registered service
    with no checks is passing, as in Consul. Checks of another node than ``node`` (when named)
    or of another service are ignored.
    """
    if checks is None:
        what = f"Service {service_id!r}" if service_id else f"Node {node!r}"
        return CheckResult(CRITICAL, f"{what} not found")
    relevant = [
        c
        for c in checks
        if (not node or not c.node or c.node == node) and c.service_id in ("", service_id)
    ]
    if not relevant:
        return CheckResult(PASSING, "No checks found.")
    status = worst(c.status for c in relevant)
    if status == PASSING:
        return CheckResult(PASSING, "All checks passing.")
    failing = [c for c in relevant if c.status == status]
    first = sorted(failing, key=lambda c: c.check_id)[0]
    return CheckResult(status, truncate(f"Aliased check {first.name!r} {status}: {first.output}"))


# -- what goes to the catalog, and when -------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What to do with a new result: send it now, or not before ``due`` (an output-only change
    within the output interval; the newest output is sent then), or nothing (``due`` None)."""

    now: bool
    due: float | None = None


def report(
    sent: CheckResult | None,
    sent_at: float,
    new: CheckResult,
    now: float,
    output_every: float = OUTPUT_EVERY,
) -> Report:
    """Whether ``new`` goes to the catalog, given what was last ``sent`` there (at ``sent_at``).

    A status change goes at once. An output-only change goes at once only if the last send is at
    least ``output_every`` old; otherwise it waits until then (``due``), so a body that changes on
    every probe (a timestamp) costs one write per ``output_every``, not one per interval. This is
    Consul's ``check_update_interval``; ``output_every`` 0 sends every change at once.
    """
    if sent is None or sent.status != new.status:
        return Report(True)
    if sent.output == new.output:
        return Report(False)
    due = sent_at + output_every
    if now >= due:
        return Report(True)
    return Report(False, due)


def critical_since(since: float | None, status: str, now: float) -> float | None:
    """Since when a check has been critical without a break: kept while it stays critical,
    started now when it turns critical, cleared when it is anything else."""
    if status != CRITICAL:
        return None
    return now if since is None else since


def deregister_at(since: float | None, after: float) -> float | None:
    """When the service of a check critical since ``since`` is to be deregistered (None: never:
    not critical, or ``after`` is 0)."""
    if since is None or after <= 0:
        return None
    return since + after


def services_to_deregister(
    checks: Mapping[str, tuple[str, float | None, float]], now: float, done: set[str]
) -> list[str]:
    """The services to deregister now: ``checks`` maps a check ID to (service ID, critical
    since, deregister_critical_after); ``done`` holds the services already reported, each
    reported once. Node checks (service ID "") never deregister anything."""
    out: list[str] = []
    for service_id, since, after in checks.values():
        at = deregister_at(since, after)
        if service_id and at is not None and now >= at and service_id not in done:
            if service_id not in out:
                out.append(service_id)
    return sorted(out)
