"""``trellis lock PREFIX CMD...``: run a command while holding a lock (``consul lock``).

Theory of operation
-------------------
A session (TTL 15s, renewed every 5s by a thread) holds the lock, on Consul's recipes:

* ``-n 1`` (leader election): ``PREFIX/.lock`` acquired with the session. Contenders wait on
  a blocking read of the key and try again when it changes.
* ``-n N`` (a semaphore, as Consul's semaphore guide): each contender acquires its own key
  ``PREFIX/<session>`` with its session (session behaviour ``delete``, so a dead contender's
  key goes away), then adds itself to the holders in ``PREFIX/.lock`` (JSON ``{"Limit": N,
  "Holders": {"<session>": true}}``) by check-and-set, dropping holders whose contender key
  is gone or unlocked; while the holders are full it waits on a blocking read of the prefix.

While the command runs, a monitor thread watches the lock (blocking reads) and the renewer
watches the session; if either finds it lost (the session invalidated, the key taken or
deleted, this contender dropped from the holders), the command's process group is stopped
(SIGTERM, then SIGKILL after a grace period) and ``trellis lock`` exits 1. Otherwise it exits
with the command's exit code, after releasing the lock and destroying the session. SIGINT and
SIGTERM are passed on to the command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
from typing import Any

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    UsageError,
    duration,
    uint,
)
from trellis.proxy.client import APIError, Client, KVPair

#: Consul's flag values marking the keys its lock and semaphore helpers write.
LOCK_FLAG = 0x2DDCCBC058A50C18
SEMAPHORE_FLAG = 0xE0F69A2BAA414DE0
SESSION_TTL = "15s"
RENEW_EVERY = 5.0
#: A blocking read's wait while contending or monitoring.
WATCH_WAIT = 15.0
#: Between the child's SIGTERM and its SIGKILL, when the lock is lost.
KILL_GRACE = 5.0
#: When a free lock refused us (its lock delay runs), how long until the next try.
DELAY_RETRY = 1.0


def _flags(p: FlagParser) -> None:
    p.flag(
        "n",
        type=uint,
        default=1,
        metavar="int",
        help="Maximum number of concurrent holders: 1 (the default) is a lock, more is a "
        "semaphore.",
    )
    p.flag(
        "name",
        default="",
        metavar="string",
        help='Name of the session. The default is "Trellis lock for <command> at <prefix>".',
    )
    p.flag(
        "try",
        type=duration,
        default=None,
        metavar="duration",
        help="Give up (exit 1) if the lock is not acquired within this time. The default is "
        "to wait as long as it takes.",
    )
    p.flag("verbose", action="store_true", help="Say what happens, on stderr.")


class _Lost:
    """Set once the lock is lost; says why."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


class Holder:
    """One contender: its session, acquiring, watching and releasing (see the module)."""

    def __init__(self, client: Client, prefix: str, limit: int, name: str) -> None:
        self.client = client
        self.prefix = prefix.strip("/")
        self.limit = limit
        self.name = name
        self.lock_key = f"{self.prefix}/.lock"
        self.session = ""
        self.lost = _Lost()
        self.stop = threading.Event()

    # -- the session ----------------------------------------------------------------------

    def open_session(self) -> None:
        body = {"Name": self.name, "TTL": SESSION_TTL}
        if self.limit > 1:
            body["Behavior"] = "delete"
        r = self.client.request("PUT", "/v1/session/create", json=body)
        self.session = str(r.json()["ID"])
        threading.Thread(target=self._renew, name="trellis-lock-renew", daemon=True).start()

    def _renew(self) -> None:
        while not self.stop.wait(RENEW_EVERY):
            try:
                r = self.client.request("PUT", f"/v1/session/renew/{self.session}", allow=(404,))
            except APIError:
                continue  # the server is unreachable for now: the TTL leaves room to retry
            if r.status == 404:
                self.lost.set("the session was invalidated")
                return

    def close(self) -> None:
        self.stop.set()
        if self.session:
            try:
                self.client.request("PUT", f"/v1/session/destroy/{self.session}")
            except APIError:
                pass  # its TTL ends it

    # -- acquiring --------------------------------------------------------------------------

    def acquire(self, deadline: float | None) -> bool:
        if self.limit == 1:
            return self._acquire_lock(deadline)
        return self._acquire_semaphore(deadline)

    def _put(self, key: str, body: bytes, **params: Any) -> bool:
        r = self.client.request("PUT", f"/v1/kv/{key}", params=params, content=body)
        return r.json() is True

    def _wait(self, deadline: float | None) -> float | None:
        """The wait of the next blocking read; None when the deadline has passed."""
        if deadline is None:
            return WATCH_WAIT
        left = deadline - time.monotonic()
        return min(WATCH_WAIT, left) if left > 0 else None

    def _acquire_lock(self, deadline: float | None) -> bool:
        index = 0
        while True:
            if self._put(self.lock_key, b"", acquire=self.session, flags=LOCK_FLAG):
                return True
            wait = self._wait(deadline)
            if wait is None:
                return False
            got = self.client.kv_get(self.lock_key, index=index, wait=wait)
            pair = got.value
            if pair is not None and pair.flags != LOCK_FLAG:
                raise CommandError(f"Error! {self.lock_key} is not a lock (its flags differ)")
            index = got.index or 0
            if pair is None or not pair.session:
                # Free but refused: its lock delay runs. Nothing will change the key when it
                # ends, so try again after a short pause rather than a blocking read.
                self.stop.wait(min(DELAY_RETRY, wait))
                index = 0

    def _acquire_semaphore(self, deadline: float | None) -> bool:
        mine = f"{self.prefix}/{self.session}"
        if not self._put(mine, b"", acquire=self.session, flags=SEMAPHORE_FLAG):
            raise CommandError(f"Error! Could not take the contender key {mine}")
        index = 0
        while True:
            got = self.client.kv_get(self.prefix + "/", recurse=True)
            index = max(index, got.index or 0)
            lock, holders = self._semaphore_state(got.value)
            if len(holders) < self.limit:
                holders[self.session] = True
                body = json.dumps({"Limit": self.limit, "Holders": holders}).encode()
                cas = lock.modify_index if lock is not None else 0
                if self._put(self.lock_key, body, cas=cas, flags=SEMAPHORE_FLAG):
                    return True
                continue  # another contender changed it first: read again
            wait = self._wait(deadline)
            if wait is None:
                return False
            got = self.client.kv_get(self.prefix + "/", recurse=True, index=index, wait=wait)
            index = got.index or 0

    def _semaphore_state(self, pairs: list[KVPair]) -> tuple[KVPair | None, dict[str, bool]]:
        """The ``.lock`` entry and its live holders (those whose contender key is held)."""
        lock = None
        live = set()
        for p in pairs:
            if p.key == self.lock_key:
                lock = p
            elif p.session and p.key.startswith(self.prefix + "/"):
                live.add(p.key[len(self.prefix) + 1 :])
        state: dict[str, Any] = {"Limit": self.limit, "Holders": {}}
        if lock is not None and lock.value:
            try:
                state = json.loads(lock.value)
            except ValueError:
                raise CommandError(f"Error! {self.lock_key} does not hold a semaphore") from None
        if not isinstance(state, dict) or not isinstance(state.get("Holders"), dict):
            raise CommandError(f"Error! {self.lock_key} does not hold a semaphore")
        if state.get("Limit") != self.limit:
            raise CommandError(
                f"Error! Semaphore limit conflict (lock: {state.get('Limit')}, local: {self.limit})"
            )
        return lock, {h: True for h in state["Holders"] if h in live}

    # -- holding ----------------------------------------------------------------------------

    def monitor(self) -> None:
        """Watch the lock until ``stop``; set ``lost`` when it is no longer ours."""
        index = 0
        while not self.stop.is_set():
            try:
                if self.limit == 1:
                    got = self.client.kv_get(self.lock_key, index=index, wait=WATCH_WAIT)
                    pair = got.value
                    if pair is None or pair.session != self.session:
                        self.lost.set(f"{self.lock_key} is no longer held by this session")
                        return
                else:
                    got = self.client.kv_get(
                        self.prefix + "/", recurse=True, index=index, wait=WATCH_WAIT
                    )
                    keys = {p.key: p for p in got.value}
                    mine = keys.get(f"{self.prefix}/{self.session}")
                    if mine is None or mine.session != self.session:
                        self.lost.set("this contender's key is gone")
                        return
                    lock = keys.get(self.lock_key)
                    holders = json.loads(lock.value or b"{}").get("Holders", {}) if lock else {}
                    if self.session not in holders:
                        self.lost.set("this contender is no longer among the holders")
                        return
                index = got.index or 0
            except APIError:
                self.stop.wait(1.0)  # unreachable for now: the session's TTL decides

    def release(self) -> None:
        try:
            if self.limit == 1:
                self._put(self.lock_key, b"", release=self.session, flags=LOCK_FLAG)
                return
            while True:
                got = self.client.kv_get(self.lock_key)
                lock = got.value
                if lock is None or not lock.value:
                    break
                state = json.loads(lock.value)
                if self.session not in state.get("Holders", {}):
                    break
                del state["Holders"][self.session]
                body = json.dumps(state).encode()
                if self._put(self.lock_key, body, cas=lock.modify_index, flags=SEMAPHORE_FLAG):
                    break
            self.client.kv_delete(f"{self.prefix}/{self.session}")
        except (APIError, ValueError):
            pass  # destroying the session (next) releases or deletes what is left


def _exit_code(returncode: int) -> int:
    # A child ended by a signal: the shell's convention, 128 + the signal.
    return 128 - returncode if returncode < 0 else returncode


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def lock(ctx: Context, ns: argparse.Namespace) -> int:
    args = list(ns.args)
    if len(args) < 2:
        raise UsageError("Error! Missing PREFIX and/or CMD arguments")
    prefix, command = args[0], args[1:]
    if not prefix.strip("/"):
        raise UsageError("Error! PREFIX must name a key prefix")
    if ns.n < 1:
        raise UsageError("Error! -n must be at least 1")
    # One argument is a shell command line ("make && make install"), as consul lock runs
    # it; several are the program and its arguments, run as they are (no quoting to undo).
    argv = ["/bin/sh", "-c", command[0]] if len(command) == 1 else command
    name = ns.name or f"Trellis lock for {' '.join(command)[:64]} at {prefix}"

    def say(text: str) -> None:
        if ns.verbose:
            ctx.err(text)

    client = ctx.client(ns)
    holder = Holder(client, prefix, ns.n, name)
    try:
        holder.open_session()
        give_up = getattr(ns, "try")  # a keyword, so not ns.try
        deadline = time.monotonic() + give_up if give_up is not None else None
        say(f"Attempting lock at prefix: {holder.prefix}")
        if not holder.acquire(deadline):
            raise CommandError("Error! Lock acquisition timed out (-try)")
        say("Lock acquired")
        ctx.stdout.flush()
        try:
            child = subprocess.Popen(argv, start_new_session=True)
        except OSError as e:
            raise CommandError(f"Error! Cannot start the command: {e.strerror}") from None
        threading.Thread(target=holder.monitor, name="trellis-lock-monitor", daemon=True).start()
        previous = _pass_signals_to(child)
        try:
            while child.poll() is None:
                if holder.lost.event.wait(0.1):
                    ctx.err(f"Lock lost ({holder.lost.reason}), stopping the command")
                    _stop_child(child)
                    return 1
        finally:
            _restore_signals(previous)
        say(f"Command exited with {child.returncode}")
        return _exit_code(child.returncode)
    finally:
        holder.stop.set()
        holder.release()
        holder.close()
        client.close()


def _pass_signals_to(child: subprocess.Popen[bytes]) -> dict[int, Any]:
    """Forward SIGINT and SIGTERM to the command's process group while it runs."""

    def forward(signum: int, frame: Any) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread (run in-process): nothing to forward
            break
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def register(r: Registry) -> None:
    r.add(
        Command(
            ("lock",),
            "Execute a command holding a lock",
            "trellis lock [options] PREFIX CMD [ARGS...]",
            lock,
            _flags,
            description="""
            Acquires a lock (or, with -n, a semaphore slot) at PREFIX in the key-value
            store, runs the command while holding it, and releases it when the command
            ends. If the lock is lost meanwhile, the command is stopped (SIGTERM, then
            SIGKILL) and trellis lock exits 1; otherwise it exits with the command's code.

                $ trellis lock service/backup "./backup.sh && ./prune.sh"
                $ trellis lock -n 3 service/workers -- ./worker --fast

            A single CMD argument runs through "sh -c"; several run as they are. Put
            the command after "--" when it has flags of trellis lock's own names.
            """,
        )
    )
