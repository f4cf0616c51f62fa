"""The node agent's health-check runner: HTTP, TCP, TTL, alias and script checks, run on the node.

Theory of operation
-------------------

The agent's spine hands :class:`Runner` the whole desired set of checks whenever it changes
(:meth:`Runner.update`); the runner works out what to add, restart and stop. Each check is an
``_Entry``: its definition, its current result, what was last *sent* to the catalog (through
``on_change``) and when, and since when it has been critical.

* **Tasks.** Inside :meth:`Runner.run` (one trio nursery) every HTTP, TCP and script check has
  one task that sleeps a jittered first delay (a uniform draw over one interval, so an agent
  starting 200 checks does not probe them in one burst), then probes, records the result and
  sleeps its interval (never below 1 s), until its entry is replaced or removed (its cancel
  scope). An alias check has one task that follows the aliased service through the injected
  :class:`AliasSource` (a blocking query, not a poll). TTL checks have no task.
* **One timer loop** (the body of ``run``) owns everything that happens at a time rather than on
  a probe: TTL expiry, deferred output sends, and ``deregister_critical_after``. It sleeps until
  the earliest of those, or until woken by a change that may move it earlier.
* **Probes are bounded.** HTTP and TCP probes share one ``trio.CapacityLimiter`` (``max_probes``,
  128 by default), scripts another (``max_scripts``, 8): each probe in flight holds a socket or a
  process, and a burst of them (an agent restart, a slow app) must not exhaust descriptors or
  fork a process per check at once. The timeout runs from when the probe starts, not while it
  waits for a slot.
* **What goes out.** A result is recorded on the entry; the pure ``checkrules.report`` decides
  whether it is sent: a status change at once, an output-only change at most once per
  ``output_every`` (Consul's ``check_update_interval``, 5 minutes by default; the newest output is
  sent when the interval is up), an unchanged result never. A fleet of stable checks sends
  nothing; the agent re-syncs what it likes by reading :meth:`Runner.results`.
* **Where I/O happens.** Only in the injected probers (:class:`HTTPProber`, :class:`TCPProber`,
  :class:`ScriptRunner`, :class:`AliasSource`); their defaults are at the end of this module.
  What an observation *means* is ``trellis.proxy.agent.checkrules``.

Threads: :meth:`Runner.update`, :meth:`Runner.ttl_update` and :meth:`Runner.results` are called
from the trio thread that runs :meth:`Runner.run` (from trio tasks, or before ``run`` starts);
they never block. Another thread must go through ``trio.from_thread.run_sync``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import ssl
import subprocess
from base64 import b64encode
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import h11
import trio

from trellis.proxy.agent import checkrules as rules
from trellis.proxy.agent.ports import CRITICAL, CheckDef, CheckResult

if TYPE_CHECKING:
    from trellis.proxy import client as api

log = logging.getLogger("trellis.agent")

#: Probes (HTTP, TCP) in flight at once on one agent; see the module docstring.
MAX_PROBES = 128
#: Script checks running at once on one agent.
MAX_SCRIPTS = 8
#: Extra time a script gets to be killed and reaped after its timeout, before the runner stops
#: waiting for it.
SCRIPT_GRACE = 5.0


class CheckRefused(ValueError):
    """Checks ``update`` would not run: the definition's fault (whoever registered it).

    ``refused`` maps every refused check ID to its reason; ``check_id`` and ``reason`` are the
    first of them. The acceptable checks of the same ``update`` were applied.
    """

    def __init__(self, check_id: str, reason: str, *, also: Mapping[str, str] | None = None):
        self.check_id = check_id
        self.reason = reason
        self.refused = {check_id: reason, **(also or {})}
        super().__init__("; ".join(f"check {k!r}: {v}" for k, v in self.refused.items()))


class ProbeFailed(Exception):
    """A probe got no answer (refused, reset, unreachable, TLS refused): the target's fault, and
    a critical result, not an error of the agent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- what the runner is given (the I/O), as small protocols ------------------------------------


@dataclass(frozen=True)
class HTTPAnswer:
    status: int
    reason: str
    body: bytes  # at most checkrules.OUTPUT_LIMIT bytes
    location: str | None = None


class HTTPProber(Protocol):
    async def request(
        self, method: str, url: str, headers: Sequence[tuple[str, str]], *, verify: bool
    ) -> HTTPAnswer:
        """One request, no redirect followed; ProbeFailed when there is no answer. Cancelled by
        the runner at the check's timeout."""
        ...


class TCPProber(Protocol):
    async def connect(self, host: str, port: int) -> None:
        """Connect and close; ProbeFailed when no connection. Cancelled at the timeout."""
        ...


@dataclass(frozen=True)
class ScriptOutcome:
    code: int | None  # the exit status; None when killed at the timeout or not started
    output: bytes  # stdout and stderr together, at most checkrules.OUTPUT_LIMIT bytes
    timed_out: bool = False


class ScriptRunner(Protocol):
    async def run(self, args: Sequence[str], timeout: float) -> ScriptOutcome:
        """Run ``args``; kill it (and everything it started) at ``timeout``; never leave a
        process behind, also when cancelled."""
        ...


class AliasSource(Protocol):
    async def watch(
        self, node: str, service_id: str, index: int | None
    ) -> tuple[Sequence[rules.AliasCheck] | None, int | None]:
        """The checks of ``service_id`` on ``node`` ("" = this agent's node) with that node's
        own checks, or None when the service (the node, when ``service_id`` is "") is not
        registered; and an index. Given the index it returned last, it may block until
        something changes. Raises ProbeFailed (or the client's APIError) when it cannot tell."""
        ...


# -- the runner ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    check: CheckDef
    result: CheckResult
    sent: CheckResult  # what the catalog holds, as far as this runner knows
    sent_at: float  # when it was sent; -inf: never by this runner (the agent registered it)
    since: float | None  # critical without a break since then
    due: float | None = None  # an output-only change waits until then
    ttl_deadline: float = math.inf
    expired: bool = False  # a TTL check whose TTL ran out (until its next update)
    started: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Runner:
    """Runs the agent's checks; see the module docstring.

    ``on_change(check_id, result)`` is called when a result is to be sent to the catalog: from
    the runner's trio tasks, and synchronously from within :meth:`ttl_update` (the new state of
    a TTL check) and :meth:`update` (a check whose kind changed starts over at its initial
    status). ``on_deregister(service_id)`` is called once when a service's check has been
    critical for its ``deregister_critical_after``. Both must return promptly and not raise (an
    exception is logged and ignored); to do I/O, hand the work to a task. ``clock`` must
    advance with trio's clock (its default is trio's clock; a test's MockClock is trio's too).
    """

    def __init__(
        self,
        *,
        on_change: Callable[[str, CheckResult], None],
        on_deregister: Callable[[str], None],
        enable_script_checks: bool = False,
        clock: Callable[[], float] = trio.current_time,
        http: HTTPProber | None = None,
        tcp: TCPProber | None = None,
        alias: AliasSource | None = None,
        scripts: ScriptRunner | None = None,
        output_every: float = rules.OUTPUT_EVERY,
        max_probes: int = MAX_PROBES,
        max_scripts: int = MAX_SCRIPTS,
        rng: random.Random | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_deregister = on_deregister
        self._scripts_enabled = enable_script_checks
        self._clock = clock
        self._http: HTTPProber = http or H11Prober()
        self._tcp: TCPProber = tcp or SocketProber()
        self._alias = alias
        self._scripts: ScriptRunner = scripts or ProcessRunner()
        self._output_every = output_every
        self._probe_limit = trio.CapacityLimiter(max_probes)
        self._script_limit = trio.CapacityLimiter(max_scripts)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._entries: dict[str, _Entry] = {}
        self._reaped: set[str] = set()  # services reported to on_deregister
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._planned = math.inf  # when the timer loop will look again

    # -- the spine's side ------------------------------------------------------------------

    def update(self, checks: Mapping[str, CheckDef]) -> None:
        """Make the running set ``checks`` (keyed by check ID): add, restart the changed ones
        (keeping the last result when the kind is the same), stop the others.

        Raises CheckRefused listing every check it will not run (a script check on an agent
        without ``enable_script_checks``, a malformed definition), after applying the rest; a
        refused check is not run, nor any earlier version of it.
        """
        now = self._clock()
        refused: dict[str, str] = {}
        wanted: dict[str, CheckDef] = {}
        for check_id, check in checks.items():
            why = rules.refusal(check, enable_script_checks=self._scripts_enabled)
            if why is None:
                wanted[check_id] = check
            else:
                refused[check_id] = why
        for check_id in [c for c in self._entries if c not in wanted]:
            self._entries.pop(check_id).scope.cancel()
        for check_id, check in wanted.items():
            old = self._entries.get(check_id)
            if old is not None and old.check == check:
                continue
            entry = self._entry(check, old, now)
            if old is not None:
                old.scope.cancel()
            self._entries[check_id] = entry
            if old is not None and old.check.kind != check.kind and entry.result != entry.sent:
                self._send(check_id, entry, now)  # it starts over at its initial status
        services = {e.check.service_id for e in self._entries.values()}
        self._reaped &= services
        self._wake.set()
        if refused:
            first, *rest = sorted(refused)
            raise CheckRefused(first, refused[first], also={k: refused[k] for k in rest})

    def ttl_update(self, check_id: str, status: str, output: str) -> bool:
        """A TTL check's new state (``PUT /v1/agent/check/pass|warn|fail|update``): resets its
        TTL. False when ``check_id`` is not a TTL check this runner runs; ValueError when
        ``status`` is not passing, warning or critical (the caller's fault)."""
        entry = self._entries.get(check_id)
        if entry is None or entry.check.kind != "ttl":
            return False
        if status not in rules.STATUSES:
            raise ValueError(f"status must be one of {', '.join(rules.STATUSES)}, not {status!r}")
        now = self._clock()
        entry.ttl_deadline = now + entry.check.ttl
        entry.expired = False
        self._record(check_id, entry, CheckResult(status, rules.truncate(output)))
        self._timer(entry.ttl_deadline)
        return True

    def results(self) -> Mapping[str, CheckResult]:
        """The current result of every check run (what a periodic re-sync pushes)."""
        return {check_id: e.result for check_id, e in self._entries.items()}

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the checks until cancelled (started: once the checks known so far are running)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                started = False
                while True:
                    self._wake = trio.Event()
                    self._start_tasks(nursery)
                    if not started:
                        task_status.started()
                        started = True
                    self._planned = self._fire_timers(self._clock())
                    with trio.move_on_after(max(0.0, self._planned - self._clock())):
                        await self._wake.wait()
            finally:
                self._nursery = None
                for entry in self._entries.values():
                    entry.started = False
                    entry.scope = trio.CancelScope()

    # -- bookkeeping ----------------------------------------------------------------------

    def _entry(self, check: CheckDef, old: _Entry | None, now: float) -> _Entry:
        if old is not None and old.check.kind == check.kind:
            entry = _Entry(check, old.result, old.sent, old.sent_at, old.since, old.due)
            entry.expired = old.expired
        else:
            initial = CheckResult(check.status, "")
            sent = old.sent if old is not None else initial
            sent_at = old.sent_at if old is not None else -math.inf
            since = rules.critical_since(None, initial.status, now)
            entry = _Entry(check, initial, sent, sent_at, since)
        if check.kind == "ttl" and not entry.expired:
            entry.ttl_deadline = now + check.ttl
        return entry

    def _record(self, check_id: str, entry: _Entry, result: CheckResult) -> None:
        if self._entries.get(check_id) is not entry:
            return  # a probe of a check since replaced or removed
        now = self._clock()
        entry.result = result
        since = rules.critical_since(entry.since, result.status, now)
        if since is None and entry.check.service_id in self._reaped:
            self._reaped.discard(entry.check.service_id)  # back: it may be reaped again later
        if since != entry.since:
            entry.since = since
            at = rules.deregister_at(since, entry.check.deregister_critical_after)
            if at is not None:
                self._timer(at)
        decision = rules.report(entry.sent, entry.sent_at, result, now, self._output_every)
        if decision.now:
            self._send(check_id, entry, now)
        elif decision.due is not None:
            entry.due = decision.due
            self._timer(decision.due)
        else:
            entry.due = None  # back to what the catalog holds: nothing to send later

    def _send(self, check_id: str, entry: _Entry, now: float) -> None:
        entry.sent, entry.sent_at, entry.due = entry.result, now, None
        try:
            self._on_change(check_id, entry.result)
        except Exception:
            log.exception("check %s: on_change failed", check_id)

    def _timer(self, at: float) -> None:
        """Wake the timer loop if ``at`` is earlier than when it will look next."""
        if at < self._planned:
            self._wake.set()

    def _fire_timers(self, now: float) -> float:
        """Do what is due (TTL expiry, deferred sends, deregistration); return when next."""
        for check_id, entry in list(self._entries.items()):
            if entry.check.kind == "ttl" and not entry.expired and now >= entry.ttl_deadline:
                entry.expired = True
                self._record(check_id, entry, rules.ttl_expired(entry.result.output))
            if entry.due is not None and now >= entry.due:
                self._send(check_id, entry, now)
        timers = {
            c: (e.check.service_id, e.since, e.check.deregister_critical_after)
            for c, e in self._entries.items()
        }
        for service_id in rules.services_to_deregister(timers, now, self._reaped):
            self._reaped.add(service_id)
            log.warning(
                "service %s critical for longer than its deregister_critical_service_after: "
                "deregistering it",
                service_id,
            )
            try:
                self._on_deregister(service_id)
            except Exception:
                log.exception("service %s: on_deregister failed", service_id)
        nxt = math.inf
        for entry in self._entries.values():
            if entry.check.kind == "ttl" and not entry.expired:
                nxt = min(nxt, entry.ttl_deadline)
            if entry.due is not None:
                nxt = min(nxt, entry.due)
            service_id = entry.check.service_id
            at = rules.deregister_at(entry.since, entry.check.deregister_critical_after)
            if at is not None and service_id and service_id not in self._reaped:
                nxt = min(nxt, at)
        return nxt

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        for check_id, entry in self._entries.items():
            if entry.started or entry.check.kind == "ttl":
                continue
            entry.started = True
            if entry.check.kind == "alias":
                nursery.start_soon(self._follow_alias, check_id, entry)
            else:
                nursery.start_soon(self._periodic, check_id, entry)

    # -- the tasks ------------------------------------------------------------------------

    async def _periodic(self, check_id: str, entry: _Entry) -> None:
        check = entry.check
        interval = rules.interval_of(check)
        with entry.scope:
            await trio.sleep(rules.first_delay(interval, self._rng.random()))
            while True:
                try:
                    result = await self.probe(check)
                except Exception as e:  # a prober's bug must not stop every other check
                    log.exception("check %s: the probe failed", check_id)
                    result = CheckResult(CRITICAL, f"the agent could not run this check: {e}")
                self._record(check_id, entry, result)
                await trio.sleep(interval)

    async def probe(self, check: CheckDef) -> CheckResult:
        """Run ``check`` once (HTTP, TCP or script) and return its result."""
        if check.kind == "script":
            async with self._script_limit:
                with trio.move_on_after(check.timeout + SCRIPT_GRACE):
                    out = await self._scripts.run(check.args, check.timeout)
                    return rules.script_result(
                        out.code, out.output, timed_out=out.timed_out, timeout=check.timeout
                    )
                return rules.script_result(None, b"", timed_out=True, timeout=check.timeout)
        async with self._probe_limit:
            if check.kind == "http":
                return await self._probe_http(check)
            return await self._probe_tcp(check)

    async def _probe_http(self, check: CheckDef) -> CheckResult:
        headers = [(k, v) for k, values in check.header.items() for v in values]
        shown = check.method.upper()
        method, url = shown, check.http
        with trio.move_on_after(check.timeout):
            for hops in range(rules.MAX_REDIRECTS + 1):
                try:
                    answer = await self._http.request(
                        method, url, headers, verify=not check.tls_skip_verify
                    )
                except ProbeFailed as e:
                    return rules.http_failure(shown, check.http, e.reason)
                hop = rules.redirect(method, url, answer.status, answer.location, hops)
                if hop is None or hop.target is None:
                    result = rules.http_result(
                        shown, check.http, answer.status, answer.reason, answer.body
                    )
                    if hop is not None:
                        result = CheckResult(result.status, f"{result.output} ({hop.why})")
                    return result
                method, url = hop.method, hop.target
        return rules.http_failure(shown, check.http, f"timed out after {check.timeout:g}s")

    async def _probe_tcp(self, check: CheckDef) -> CheckResult:
        host, port = rules.host_port(check.tcp)
        with trio.move_on_after(check.timeout):
            try:
                await self._tcp.connect(host, port)
            except ProbeFailed as e:
                return rules.tcp_result(check.tcp, e.reason)
            return rules.tcp_result(check.tcp, None)
        return rules.tcp_result(check.tcp, f"timed out after {check.timeout:g}s")

    async def _follow_alias(self, check_id: str, entry: _Entry) -> None:
        check = entry.check
        source = self._alias
        if source is None:
            result = CheckResult(CRITICAL, "this agent has no source for alias checks")
            self._record(check_id, entry, result)
            return
        index: int | None = None
        backoff = rules.MIN_INTERVAL
        with entry.scope:
            while True:
                try:
                    checks, new = await source.watch(check.alias_node, check.alias_service, index)
                except Exception as e:  # the source's (or its client's) failure: retry
                    # Fail static: the last result stands (the catalog cannot be told anyway
                    # while the servers are gone); say so once per failure and back off.
                    log.warning("check %s: cannot read the aliased health: %s", check_id, e)
                    index = None
                    await trio.sleep(backoff * (0.5 + self._rng.random()))
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = rules.MIN_INTERVAL
                result = rules.alias_result(
                    checks, service_id=check.alias_service, node=check.alias_node
                )
                self._record(check_id, entry, result)
                if new is None or new == index:
                    # No index, or the wait ran out: do not spin on a source that does not block.
                    await trio.sleep(rules.interval_of(check))
                index = new if new and new > 0 else None


# -- the default probers: the only code here that does I/O --------------------------------------


class H11Prober:
    """HTTP(S) probes over trio streams with h11 (a sans-I/O HTTP/1.1 parser): one fresh
    connection per probe with ``Connection: close`` (no keep-alive, as Consul's checks), no
    proxy, no redirect (the runner decides those). It reads the status line and at most the
    first 4 KiB of the body, then hangs up: a large or endless body costs nothing more.

    TLS: ``verify`` is the context of verified probes (the agent's CA file, say; by default the
    system's CAs, with hostname checking). A probe with ``verify=False`` (the check's explicit
    ``tls_skip_verify``) checks neither the chain nor the name.

    Sends ``User-Agent: Trellis Health Check`` and ``Accept: text/plain, text/*, */*`` unless
    the check's headers set them; the check's ``Host`` header, if any, replaces the URL's.
    """

    def __init__(self, verify: ssl.SSLContext | None = None) -> None:
        self._contexts: dict[bool, ssl.SSLContext] = {}
        if verify is not None:
            self._contexts[True] = verify

    def _context(self, verify: bool) -> ssl.SSLContext:
        ctx = self._contexts.get(verify)
        if ctx is None:
            ctx = ssl.create_default_context()
            if not verify:
                # Only for a check that asked for tls_skip_verify, explicitly.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._contexts[verify] = ctx
        return ctx

    async def request(
        self, method: str, url: str, headers: Sequence[tuple[str, str]], *, verify: bool
    ) -> HTTPAnswer:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError as e:
            raise ProbeFailed(str(e)) from None
        host = parts.hostname or ""
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        given = {k.lower() for k, _ in headers}
        implied = [
            ("Host", parts.netloc.rpartition("@")[2]),
            ("User-Agent", "Trellis Health Check"),
            ("Accept", "text/plain, text/*, */*"),
            ("Connection", "close"),
        ]
        if parts.username is not None:  # http://user:password@host/, as browsers and Go do
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            implied.append(("Authorization", "Basic " + b64encode(userinfo.encode()).decode()))
        if method in ("POST", "PUT", "PATCH"):
            implied.append(("Content-Length", "0"))
        send = [(k, v) for k, v in implied if k.lower() not in given] + list(headers)
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise ProbeFailed(_reason(e)) from None
        try:
            if tls:
                stream = trio.SSLStream(
                    stream, self._context(verify), server_hostname=host, https_compatible=True
                )
                await stream.do_handshake()
            return await self._exchange(stream, method, target, send)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as e:
            raise ProbeFailed(_reason(e)) from None
        except ValueError as e:  # a header h11 cannot send (not ASCII, say): the check's fault
            raise ProbeFailed(f"cannot send this request: {e}") from None
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _exchange(
        stream: trio.abc.Stream, method: str, target: str, headers: list[tuple[str, str]]
    ) -> HTTPAnswer:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method=method, target=target, headers=headers)
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        answer: h11.Response | None = None
        body = bytearray()
        while len(body) < rules.OUTPUT_LIMIT:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                answer = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
            # h11.InformationalResponse (1xx): the final answer follows
        if answer is None:
            raise ProbeFailed("the connection closed before an answer")
        location = next((v for k, v in answer.headers if k == b"location"), None)
        return HTTPAnswer(
            answer.status_code,
            answer.reason.decode("latin-1"),
            bytes(body[: rules.OUTPUT_LIMIT]),
            location.decode("latin-1") if location is not None else None,
        )


def _reason(e: BaseException, depth: int = 0) -> str:
    """The socket-level reason under a connection error: trio reports "all attempts to connect
    failed" with each attempt's error in an exception group as its cause."""
    while depth < 8 and not isinstance(e, BaseExceptionGroup):
        inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e, depth = inner, depth + 1
    if isinstance(e, BaseExceptionGroup) and depth < 8:
        return "; ".join(dict.fromkeys(_reason(x, depth + 1) for x in e.exceptions))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class SocketProber:
    """TCP probes: connect (every address the name resolves to, as trio does) and close."""

    async def connect(self, host: str, port: int) -> None:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise ProbeFailed(_reason(e)) from None
        await stream.aclose()


class ProcessRunner:
    """Script checks as child processes, each in its own process group (a new session): at the
    timeout, on cancellation and after the script exits, the whole group is killed by its ID,
    so nothing the script started outlives it. The group is killed while its leader is still
    unreaped (a zombie holds its PID), so the group ID cannot have been reused by then."""

    async def run(self, args: Sequence[str], timeout: float) -> ScriptOutcome:
        try:
            proc = await trio.lowlevel.open_process(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            return ScriptOutcome(None, f"cannot run {args[0]!r}: {e}".encode())
        assert proc.stdout is not None
        stdout = proc.stdout
        buf = bytearray()
        drained = trio.Event()

        async def read() -> None:
            try:
                while chunk := await stdout.receive_some(65536):
                    if len(buf) < rules.OUTPUT_LIMIT:
                        buf.extend(chunk[: rules.OUTPUT_LIMIT - len(buf)])
            except trio.ClosedResourceError:
                pass
            drained.set()

        pidfd = -1
        timed_out = False
        try:
            pidfd = os.pidfd_open(proc.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                with trio.move_on_after(timeout) as waiting:
                    await trio.lowlevel.wait_readable(pidfd)  # exited, not yet reaped
                timed_out = waiting.cancelled_caught
                _kill_group(proc.pid)  # the script at its timeout; what it left running
                # With the group gone the pipe ends; a process that left the group (setsid)
                # while holding it must not hold the check up.
                with trio.move_on_after(1.0):
                    await drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            _kill_group(proc.pid)
            with trio.CancelScope(shield=True):
                await proc.wait()
                await stdout.aclose()
            if pidfd >= 0:
                os.close(pidfd)
        return ScriptOutcome(None if timed_out else proc.returncode, bytes(buf), timed_out)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone
    except PermissionError:
        pass  # a member changed its credentials (setuid): not ours to kill


class CatalogAliasSource:
    """Alias checks answered by the servers: ``/v1/health/service/<service>`` (blocking) for a
    service, ``/v1/health/node/<node>`` for a node, through ``trellis.proxy.client``.

    ``node`` is this agent's node, for an alias check that names no node. The service is looked
    up by name and matched by ID (a service whose ID is its name, the usual case); the agent
    backs alias checks of its own services with its local state instead. Each watch holds a
    worker thread while it blocks, ``max_threads`` at most.
    """

    def __init__(
        self, client: api.Client, *, node: str = "", wait: float = 60.0, max_threads: int = 32
    ) -> None:
        self.client = client
        self.node = node
        self.wait = wait
        self._threads = trio.CapacityLimiter(max_threads)

    async def watch(
        self, node: str, service_id: str, index: int | None
    ) -> tuple[Sequence[rules.AliasCheck] | None, int | None]:
        node = node or self.node
        if service_id:
            path = "/v1/health/service/" + quote(service_id, safe="")
        else:
            path = "/v1/health/node/" + quote(node, safe="")

        def call() -> tuple[Any, int | None]:
            r = self.client.request("GET", path, index=index, wait=self.wait)
            return r.json(), r.index

        body, new = await trio.to_thread.run_sync(
            call, abandon_on_cancel=True, limiter=self._threads
        )
        if not isinstance(body, list):
            raise ProbeFailed(f"{path}: the server sent a body that is not a list")
        if not service_id:
            checks = [_alias_check(c) for c in body if isinstance(c, dict)]
            return (checks or None), new
        entries = [e for e in body if isinstance(e, dict)]
        if node:
            entries = [e for e in entries if (e.get("Node") or {}).get("Node") == node]
        by_id = [e for e in entries if (e.get("Service") or {}).get("ID") == service_id]
        if not by_id:
            return None, new
        return [_alias_check(c) for c in by_id[0].get("Checks") or [] if isinstance(c, dict)], new


def _alias_check(c: Mapping[str, Any]) -> rules.AliasCheck:
    return rules.AliasCheck(
        check_id=str(c.get("CheckID", "")),
        name=str(c.get("Name", "")),
        status=str(c.get("Status", CRITICAL)),
        output=str(c.get("Output", "")),
        service_id=str(c.get("ServiceID", "")),
        node=str(c.get("Node", "")),
    )
