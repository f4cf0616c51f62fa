"""The byte path: an edge-triggered epoll reactor, hosted by trio, that accepts, shakes hands
and relays bytes for the sidecar's listeners.

Theory of operation
-------------------
Everything that is not the byte path (the follower, timers, signals, metrics) runs in trio
tasks. The byte path does not: a trio task per connection costs a scheduling round trip per
read and per write, which is most of the time a small request spends in a proxy. Instead, one
``epoll`` object holds every socket of every connection, registered edge-triggered, and one
trio task (``Reactor.run``) waits until that epoll's own descriptor turns readable, then
handles every ready event in a plain loop with no checkpoint inside, and only then gives trio
its turn again. Nothing here blocks: sockets are non-blocking, and TLS runs on
``ssl.SSLObject`` over memory BIOs, so OpenSSL never touches a socket. That is also why a
socket can be closed the moment its connection ends: no task can later resume on a descriptor
number that the kernel has meanwhile given to another connection.

Edge-triggered means an event says "something changed", once. Each handler therefore reads
until the socket would block (or until the other side cannot take more), and remembers what
it still owes: bytes not yet sent (``End.pending``), and a direction paused because its
destination was full, which it resumes itself when that destination drains (an ``EPOLLOUT``
edge), since no new edge will come for bytes already waiting.

A relayed connection (``Pipe``) joins two ``End`` objects: a plain socket (the local app, or a
local client) and a TLS socket (the mesh side). Reads decrypt into one buffer shared by the
whole reactor, and a write consumes what it was given before the next read (copying only the
part the kernel did not take), so the steady state allocates nothing but the ciphertext that
``MemoryBIO.read`` returns. Once relaying, the pipe itself is each socket's handler, and the
steady state's edge (readable, writable, not shut, nothing owed either way) takes a straight
path, ``Pipe._relay_once``: one read, one write; anything else goes through ``pump``.

The reactor knows nothing of intentions or certificates. What to do when a handshake
completes (``admit``), where to connect, and what a connection is allowed to do are decided
by its owner (``trellis.proxy.sidecar``) through the callbacks of ``Inbound`` and
``Outbound``; the connection table that re-decides open connections lives there too.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from trellis.proxy.snapshot import PeerVerdict
from trellis.proxy.tls import PeerCache, peer_identity

log = logging.getLogger("trellis.proxy")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLET = select.EPOLLET
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
_READ_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP
_WATCH = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_SHUT = EPOLLRDHUP | EPOLLHUP | EPOLLERR
#: The steady state's edge: bytes arrived on a socket that is writable and not shut.
_READABLE = EPOLLIN | EPOLLOUT

#: One read's worth, and one TLS record's plaintext (16 KiB at most). A TLS read asks for the
#: whole buffer, so it always takes a whole record and OpenSSL keeps no decrypted bytes between
#: reads (``SSLObject.pending()`` is 0): only ciphertext left in the incoming BIO means "more".
#: Not more than a record: OpenSSL's memory BIOs keep the room their largest write needed for
#: as long as the connection lives, so 64 KiB reads (four records per system call) left about
#: 130 KB in every connection that had once carried a burst; at 16 KiB it is about 20 KB, and
#: bulk throughput measured the same (tests/test_proxy_reactor_buffers.py, issue 10).
BUFFER = 16384
assert BUFFER >= 16384
#: TLS handshakes in flight at once, and how long one may hold its slot (see ``Handshakes``).
MAX_HANDSHAKES = 64
HANDSHAKE_HOLD = 1.0
#: Events taken from epoll per call.
MAX_EVENTS = 1024


class Handler(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...


@dataclass
class Counters:
    """What the byte path counts, read by the metrics endpoint at scrape time (plain ints: a
    counter update on the byte path must cost next to nothing)."""

    opened: dict[str, int] = field(default_factory=lambda: {"inbound": 0, "outbound": 0})
    open: dict[str, int] = field(default_factory=lambda: {"inbound": 0, "outbound": 0})
    bytes_in: dict[str, int] = field(default_factory=lambda: {"inbound": 0, "outbound": 0})
    bytes_out: dict[str, int] = field(default_factory=lambda: {"inbound": 0, "outbound": 0})
    handshake_failures: dict[str, int] = field(default_factory=dict)
    upstream_connect_failures: dict[str, int] = field(default_factory=dict)
    refused_over_limit: int = 0

    def fail(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1


class Handshakes:
    """A cap on the TLS handshakes in flight, which bounds the memory they leave behind.

    A handshake allocates and frees hundreds of small blocks (the key exchange, the peer's
    certificate, the transcript), and the connection keeps some of them for its life. When
    hundreds of handshakes run at once, the blocks that stay end up scattered among the freed
    ones, and the allocator can give none of that memory back: measured with this module's
    TLS objects, 1,000 connections that shook hands all at once kept 91 KB each, one after
    another 29 KB, 64 at a time 32 KB; through an ``Inbound`` listener, 1,000 clients
    handshaking at once cost 46 KB a connection without the cap and 31 KB with it (issue
    10's floor is a sidecar under 60 MB with 1,000 open connections, and a client that opens
    its pool in a burst is the common case).

    So a connection whose handshake can start (its first bytes came, or its upstream
    connection is up) takes a slot; with every slot taken it waits its turn, in order, and
    gives the slot back when its handshake ends either way. Handshakes are CPU work, so a
    burst takes as long as it did; only fewer of them are half done at any moment, and the
    first in are the first through.

    The cap is not a place where peers can park others: a slot is for a handshake that moves.
    One held for ``hold`` seconds (a peer that stalls mid-handshake, or a slow network) is
    taken back and given to the next in line, while its handshake goes on outside the cap
    until it ends or times out. Stalling peers therefore delay the others by ``hold`` at most,
    and cost the memory they would have cost without a cap.
    """

    __slots__ = ("_granting", "_tokens", "active", "clock", "held", "hold", "limit", "waiting")

    def __init__(
        self,
        limit: int = MAX_HANDSHAKES,
        hold: float = HANDSHAKE_HOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.clock = clock
        self.hold = hold
        self.active = 0
        self.waiting: collections.deque[Connection] = collections.deque()
        #: Slots in the order given: (when, connection, its slot's token).
        self.held: collections.deque[tuple[float, Connection, int]] = collections.deque()
        self._tokens = itertools.count(1)
        self._granting = False

    def take(self, conn: Connection) -> bool:
        """A slot for ``conn`` now (True; ``conn.slot`` set), or later through
        ``conn.begin_handshake`` (False; ``conn.slot`` set before that call)."""
        now = self.clock()
        if self.waiting or self.active >= self.limit:
            self.grant(now)  # those ahead first, and slots held too long back
        if self.active < self.limit and not self.waiting:
            self._give_to(conn, now)
            return True
        self.waiting.append(conn)
        return False

    def give(self) -> None:
        """A handshake ended (done, failed, or its connection closed)."""
        self.active -= 1
        self.grant(self.clock())

    def _give_to(self, conn: Connection, now: float) -> None:
        token = next(self._tokens)
        conn.slot = token
        self.active += 1
        self.held.append((now, conn, token))

    def grant(self, now: float) -> None:
        """Take back the slots held too long, then start the waiting handshakes that have a
        slot. A handshake that ends at once gives its slot back during this loop; the loop,
        not a recursion, hands it on."""
        if self._granting:
            return
        self._granting = True
        try:
            held = self.held
            while held:
                since, conn, token = held[0]
                if conn.slot != token:
                    held.popleft()  # given back already
                elif now - since > self.hold:
                    held.popleft()
                    conn.slot = 0  # its handshake goes on, outside the cap
                    self.active -= 1
                else:
                    break
            waiting = self.waiting
            while waiting and self.active < self.limit:
                conn = waiting.popleft()
                if not conn.closed:
                    self._give_to(conn, now)
                    conn.begin_handshake()
        finally:
            self._granting = False


class Reactor:
    """One epoll set of non-blocking sockets and their handlers, driven by ``run``."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)
        self.raw = bytearray(BUFFER)
        self.raw_view = memoryview(self.raw)
        self.counters = Counters()
        self.handshakes = Handshakes()
        #: Open connections by id (``Inbound``/``Outbound``), for the owner's connection table,
        #: draining and timeouts.
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self.closed = False

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, sock: socket.socket, handler: Handler, events: int = _WATCH) -> None:
        fd = sock.fileno()
        self._handlers[fd] = handler
        self._ep.register(fd, events)

    def rebind(self, fd: int, handler: Handler) -> None:
        """Hand a registered descriptor's events to another handler (no system call)."""
        self._handlers[fd] = handler

    def remove(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass  # already gone with its socket

    async def run(self) -> None:
        """Handle events until cancelled. Each batch runs without a checkpoint; between
        batches trio runs its other tasks (``wait_readable`` on the epoll descriptor)."""
        ep = self._ep
        handlers = self._handlers
        epfd = ep.fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(epfd)
                events = ep.poll(0, MAX_EVENTS)
                while events:
                    for fd, ev in events:
                        h = handlers.get(fd)
                        if h is not None:
                            h.on_event(fd, ev)
                    if len(events) < MAX_EVENTS:
                        break
                    events = ep.poll(0, MAX_EVENTS)
        finally:
            trio.lowlevel.notify_closing(epfd)
            ep.close()

    def host(self, async_fn: Callable[..., Any], *args: Any, sweep_every: float = 0.25) -> Any:
        """Run ``async_fn`` in trio as a *guest* of this reactor, and return its result.

        The other way round from ``run``: this thread's loop is the reactor's own
        ``epoll.poll``, and trio hands it its work as callbacks (trio waits for its own I/O in
        a helper thread and posts what became ready). A byte-path event then costs one
        ``epoll_wait`` and a dispatch, with no trip through trio's scheduler; trio's tasks
        (the follower, signals, metrics) still run in this thread, between event batches, so
        they share the reactor's state without locks. ``sweep`` runs every ``sweep_every``.
        """
        queue: collections.deque[Callable[[], object]] = collections.deque()
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(wake, EPOLLIN)
        done: list[Any] = []

        def soon_threadsafe(fn: Callable[[], object]) -> None:
            queue.append(fn)
            os.eventfd_write(wake, 1)

        trio.lowlevel.start_guest_run(
            async_fn,
            *args,
            run_sync_soon_threadsafe=soon_threadsafe,
            run_sync_soon_not_threadsafe=queue.append,
            done_callback=done.append,
        )
        ep = self._ep
        handlers = self._handlers
        next_sweep = time.monotonic() + sweep_every
        try:
            while not done:
                timeout = 0.0 if queue else max(0.0, next_sweep - time.monotonic())
                for fd, ev in ep.poll(timeout, MAX_EVENTS):
                    h = handlers.get(fd)
                    if h is not None:
                        h.on_event(fd, ev)
                    elif fd == wake:
                        try:
                            os.eventfd_read(wake)
                        except BlockingIOError:
                            pass
                while queue:
                    queue.popleft()()
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    self.sweep(now)
        finally:
            ep.close()
            os.close(wake)
        return done[0].unwrap()

    def sweep(self, now: float) -> None:
        """End connections past their deadline (handshake, connect) or idle too long; start
        the handshakes that waited long enough for a slot."""
        self.handshakes.grant(now)
        for conn in list(self.connections.values()):
            conn.check_time(now)

    def close(self) -> None:
        """End every connection. The epoll itself is closed when ``run`` or ``host`` ends."""
        for conn in list(self.connections.values()):
            conn.close("proxy stopped")
        self.closed = True


# -- the two ends of a relayed connection ----------------------------------------------------


class End:
    """One socket of a connection: plain, or TLS over memory BIOs (``tls`` set)."""

    __slots__ = (
        "drained",
        "dry",
        "eof_read",
        "fd",
        "final",
        "inc",
        "out",
        "pending",
        "shut_pending",
        "shut_write",
        "sock",
        "tls",
    )

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = tls
        self.inc: ssl.MemoryBIO | None = None
        self.out: ssl.MemoryBIO | None = None
        self.pending = b""  # bytes owed to this socket (ciphertext for TLS)
        self.eof_read = False  # no more will be read from this end
        self.dry = False  # nothing more to read until the next event (see read)
        self.drained = False  # this event's reads emptied the socket (TLS ends)
        #: The peer has shut its side (EPOLLRDHUP, HUP or ERR seen): a short read no longer
        #: means "empty until the next edge", since the end of stream that follows the data
        #: brings no edge of its own. Read until the kernel says EAGAIN or EOF.
        self.final = False
        self.shut_write = False  # we sent our end-of-stream to this end
        self.shut_pending = False  # ...once ``pending`` is flushed

    def start_tls(self, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        """Make this end TLS: its handshake is about to start."""
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_side=server_side)

    # -- writing ---------------------------------------------------------------------------

    def flush(self) -> int:
        """Send what is owed; returns bytes sent. OSError: the connection is broken."""
        data = self.pending
        if not data:
            return 0
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            return 0
        self.pending = data[n:]
        if not self.pending and self.shut_pending:
            self._shutdown_now()
        return n

    def _send(self, data: bytes | memoryview) -> int:
        """Send ``data`` after what is owed; keep what the kernel does not take."""
        if self.pending:
            self.pending += bytes(data)
            return self.flush()
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self.pending = bytes(data[n:])
        return n

    def write(self, data: memoryview) -> int:
        """Write plaintext; returns bytes handed to the kernel (ciphertext for TLS)."""
        tls = self.tls
        if tls is None:
            return self._send(data)
        tls.write(data)
        assert self.out is not None
        return self._send(self.out.read())

    def flush_tls(self) -> int:
        """Send what OpenSSL produced on its own (handshake messages, session tickets)."""
        out = self.out
        if out is not None and out.pending:
            return self._send(out.read())
        return 0

    def shutdown_write(self) -> None:
        """Tell this end that no more bytes will come (TLS close_notify, then FIN)."""
        if self.shut_write:
            return
        self.shut_write = True
        if self.tls is not None:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                pass  # close_notify sent; the peer's comes (or not) on the read side
            except ssl.SSLError:
                pass  # the session is already broken; the FIN still goes out
            self.flush_tls()
        if self.pending:
            self.shut_pending = True
        else:
            self._shutdown_now()

    def _shutdown_now(self) -> None:
        self.shut_pending = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone; reads will say so

    # -- reading ---------------------------------------------------------------------------

    def read(self, reactor: Reactor) -> memoryview | None:
        """Read what is available as plaintext, into the reactor's shared buffer.

        Returns a view (valid until the next read), an empty view at end of stream, or None
        when nothing is available now. Sets ``dry`` when it knows that nothing more is
        available until the next event: a read from the kernel returned less than it asked
        for (so the socket was emptied; new bytes bring a new edge) and nothing is left in
        OpenSSL's buffers. That saves the read that would only say EAGAIN, a system call per
        event. OSError or ssl.SSLError: the connection is broken.
        """
        tls = self.tls
        if tls is None:
            try:
                n = self.sock.recv_into(reactor.buffer)
            except BlockingIOError:
                return None
            if n == 0:
                self.eof_read = True
            self.dry = n < BUFFER and not self.final
            return reactor.view[:n]
        inc = self.inc
        assert inc is not None
        while True:
            if inc.pending:
                try:
                    n = tls.read(BUFFER, reactor.buffer)
                except ssl.SSLWantReadError:
                    n = -1  # a partial record (OpenSSL keeps it): more ciphertext is needed
                except ssl.SSLZeroReturnError:
                    n = 0
                if n == 0:
                    # The peer's close_notify: Python reads it as 0 bytes (or raises, once
                    # ours was sent). A peer may send it without a FIN (a half-close).
                    self.eof_read = True
                    return reactor.view[:0]
                if n > 0:
                    self.dry = self.drained and not inc.pending
                    return reactor.view[:n]
            if inc.eof:
                self.eof_read = True
                return reactor.view[:0]
            if self.drained:
                self.dry = True
                return None
            try:
                n = self.sock.recv_into(reactor.raw)
            except BlockingIOError:
                return None
            if n == 0:
                # A FIN without close_notify: the peer is gone either way. Truncation attacks
                # matter to protocols that frame by end-of-stream; the app on the other side
                # sees a plain EOF, as it would from a direct connection.
                self.eof_read = True
                return reactor.view[:0]
            inc.write(reactor.raw_view[:n])
            self.drained = n < BUFFER and not self.final

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- connections -----------------------------------------------------------------------------


class Connection:
    """What the owner's connection table and the sweep need from a connection: its deadline
    (handshake, connect) or idle time checked by the sweep, and one close that unregisters and
    closes both of its ends, then reports once."""

    id: int
    direction: str
    closed: bool
    reactor: Reactor
    deadline: float
    pipe: Pipe | None
    timeouts: Timeouts
    on_end: Callable[[Connection, str], None]
    #: The token of the reactor's handshake slot it holds, 0 for none (``Handshakes``).
    slot: int

    def ends(self) -> tuple[End | None, ...]:
        raise NotImplementedError

    def begin_handshake(self) -> None:
        """The reactor gave this connection a handshake slot it waited for."""
        raise NotImplementedError

    def _release(self) -> None:
        if self.slot:
            self.slot = 0
            self.reactor.handshakes.give()

    def timed_out(self) -> str:
        """Why the deadline ended the connection (for the log)."""
        raise NotImplementedError

    def check_time(self, now: float) -> None:
        if self.deadline and now > self.deadline:
            self.close(self.timed_out())
        elif self.pipe is not None and now - self.pipe.last > self.timeouts.idle:
            self.close("idle timeout")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        r = self.reactor
        r.connections.pop(self.id, None)
        for end in self.ends():
            if end is not None:
                r.remove(end.sock)
                end.close()
        self.on_end(self, reason)
        self._release()


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    connect: float = 10.0
    idle: float = 3600.0


class Pipe:
    """Relays bytes both ways between two ends until both directions have ended.

    ``a`` is the end the connection came in on (the accepted socket), ``b`` the one it goes
    out on. Directions pause when their destination is full and resume on its EPOLLOUT.
    """

    __slots__ = ("a", "b", "direction", "last", "on_close", "reactor")

    def __init__(
        self,
        reactor: Reactor,
        a: End,
        b: End,
        direction: str,
        on_close: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.a, self.b = a, b
        self.direction = direction
        self.on_close = on_close
        self.last = time.monotonic()

    def start(self) -> None:
        # Bytes may already wait on either side (decrypted in the BIO, or in the kernel):
        # no new edge would announce them. Those reads may meet a reset, which ends this
        # connection as it would in on_event (not the reactor: tests/test_proxy_reactor_reset.py).
        try:
            self.pump(self.a, self.b)
            self.pump(self.b, self.a)
        except (OSError, ssl.SSLError) as e:
            self.on_close(_reason(e))

    def on_event(self, fd: int, events: int) -> None:
        a, b = self.a, self.b
        src, dst = (a, b) if fd == a.fd else (b, a)
        if events == _READABLE and not (src.pending or dst.pending or src.eof_read or src.final):
            try:
                if self._relay_once(src, dst):
                    return
            except (OSError, ssl.SSLError) as e:
                self.on_close(_reason(e))
                return
        if events & _SHUT:
            src.final = True
        try:
            if events & EPOLLOUT and src.pending:
                self._count_out(src, src.flush())
                if not src.pending:
                    self.pump(dst, src)  # resume the direction that waited for room here
            if events & _READ_EVENTS:
                self.pump(src, dst)
        except (OSError, ssl.SSLError) as e:
            self.on_close(_reason(e))
            return
        if a.eof_read and b.eof_read and not a.pending and not b.pending:
            self.on_close("closed")

    def _relay_once(self, src: End, dst: End) -> bool:
        """The steady state in one straight line: one read, one write, no end of stream.

        A request or a response is one edge, one read that empties the socket and one write
        that the kernel takes whole. ``pump`` does the same through ``End.read`` and
        ``End.write`` with every case handled, and more Python per event (measured through
        one pipe: 7.4 -> 6.8 us of CPU per 1 KiB request and response, of which about 5.4
        are the system calls and OpenSSL). Returns True when the event is
        fully handled; False hands it on to ``pump``, with whatever was read here already
        written: nothing is read twice or lost. OSError, ssl.SSLError: the connection is
        broken.
        """
        reactor = self.reactor
        tls = src.tls
        if tls is None:
            try:
                n = src.sock.recv_into(reactor.buffer)
            except BlockingIOError:
                return True
            if not n:
                return False  # end of stream: pump reads it again (a FIN reads as 0 again)
            more = n == BUFFER  # the socket may hold more: pump reads on
        else:
            inc = src.inc
            assert inc is not None
            if inc.pending:
                return False  # ciphertext left by an event whose destination was full
            try:
                got = src.sock.recv_into(reactor.raw)
            except BlockingIOError:
                return True
            if not got:
                return False  # end of stream: pump reads it again
            inc.write(reactor.raw_view[:got])
            try:
                n = tls.read(BUFFER, reactor.buffer)
            except ssl.SSLWantReadError:
                # Only part of a record (OpenSSL keeps it): the rest comes with the next
                # edge, unless this read filled the buffer (then pump reads on); or only a
                # post-handshake message came, which may want an answer.
                out = src.out
                if out is not None and out.pending:
                    src.flush_tls()
                return got < BUFFER
            except ssl.SSLZeroReturnError:
                n = 0
            if not n:
                src.eof_read = True  # the peer's close_notify (see End.read)
                dst.shutdown_write()
                return False  # pump's end-of-stream path (the close check)
            more = got == BUFFER or inc.pending > 0
            out = src.out
            if out is not None and out.pending:
                src.flush_tls()  # a post-handshake message (a key update's answer)
        if dst.tls is None:
            sent = dst._send(reactor.view[:n])
        else:
            sent = dst.write(reactor.view[:n])
        self.last = time.monotonic()
        if dst is self.b:
            reactor.counters.bytes_in[self.direction] += sent
        else:
            reactor.counters.bytes_out[self.direction] += sent
        return not more or bool(dst.pending)

    def _count_out(self, end: End, n: int) -> None:
        c = self.reactor.counters
        if end is self.a:
            c.bytes_out[self.direction] += n
        else:
            c.bytes_in[self.direction] += n

    def pump(self, src: End, dst: End) -> None:
        """Move what ``src`` has to ``dst`` until ``src`` is dry or ``dst`` is full."""
        if src.eof_read or dst.pending:
            return
        reactor = self.reactor
        counters = reactor.counters
        into_b = dst is self.b
        sent = 0
        src.drained = src.dry = False
        while True:
            data = src.read(reactor)
            if data is None:
                break
            if not data:
                dst.shutdown_write()
                break
            sent += dst.write(data)
            if dst.pending or src.dry:
                break
        if src.tls is not None and src.out is not None and src.out.pending:
            src.flush_tls()  # TLS 1.3 post-handshake messages (tickets, key updates)
        if sent:
            self.last = time.monotonic()
            if into_b:
                counters.bytes_in[self.direction] += sent
            else:
                counters.bytes_out[self.direction] += sent


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, ConnectionResetError):
        return "reset by peer"
    if isinstance(e, BrokenPipeError):
        return "peer closed"
    return f"{type(e).__name__}: {e.strerror or e}" if isinstance(e, OSError) else str(e)


def _handshake(end: End) -> bool:
    """One handshake step; True when done. ssl.SSLError: the handshake failed."""
    assert end.tls is not None
    try:
        end.tls.do_handshake()
    except ssl.SSLWantReadError:
        end.flush_tls()
        return False
    end.flush_tls()
    return True


def _feed(end: End, reactor: Reactor, events: int) -> bool:
    """Move ciphertext from the socket into the TLS object; False at end of stream (a short
    read ends it early, unless ``events`` say the peer shut its side: see ``End.final``)."""
    assert end.inc is not None
    if events & _SHUT:
        end.final = True
    while True:
        try:
            n = end.sock.recv_into(reactor.raw)
        except BlockingIOError:
            return True
        if n == 0:
            return False
        end.inc.write(reactor.raw_view[:n])
        if n < BUFFER and not end.final:
            return True


def nodelay(sock: socket.socket) -> None:
    """Small requests must not wait for Nagle's algorithm (new connections fell to a fifth
    without it, measured here)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect_nonblocking(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    nodelay(sock)
    err = sock.connect_ex(address)
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock


@dataclass(frozen=True)
class Route:
    """The owner's answer when an inbound handshake completes: relay to ``target`` (and keep
    ``label`` for the connection table), or refuse with ``reason``."""

    allowed: bool
    reason: str
    target: tuple[str, int] | None = None
    label: Any = None


class Inbound(Connection):
    """A connection on a public listener: TLS handshake (client certificate required), the
    owner's admission, a plain connection to the local app, then the relay.

    The handshake waits for the client's first bytes and a handshake slot (``Handshakes``):
    a client that connects and says nothing holds no slot."""

    __slots__ = (
        "admit",
        "app",
        "closed",
        "ctx",
        "deadline",
        "direction",
        "down",
        "id",
        "label",
        "on_end",
        "peer",
        "peers",
        "pipe",
        "reactor",
        "slot",
        "state",
        "timeouts",
    )

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        peers: PeerCache,
        admit: Callable[[Inbound, PeerVerdict], Route],
        timeouts: Timeouts,
        on_end: Callable[[Connection, str], None],
    ) -> None:
        self.id = reactor.next_id()
        self.direction = "inbound"
        self.reactor = reactor
        self.down = End(sock)  # TLS from the handshake's start (begin_handshake)
        self.ctx = ctx
        self.slot = 0
        self.peers = peers
        self.admit = admit
        self.timeouts = timeouts
        self.on_end = on_end
        self.app: End | None = None
        self.pipe: Pipe | None = None
        self.peer: PeerVerdict | None = None
        self.label: Any = None
        self.state = "accepted"  # -> "waiting" (for a slot) -> "handshake" -> ...
        self.closed = False
        self.deadline = time.monotonic() + timeouts.handshake
        reactor.connections[self.id] = self
        reactor.add(sock, self)

    def on_event(self, fd: int, events: int) -> None:
        # Once relaying, the pipe is its sockets' handler (``Reactor.rebind``): the events
        # that reach this handler are those of the handshake and the app connection.
        try:
            state = self.state
            if state == "handshake":
                self._on_handshake_event(events)
            elif state == "accepted" or state == "waiting":
                self._before_handshake(events)
            elif state == "connect":
                if fd == self.down.fd:
                    # The peer may already send; keep it in the kernel until the app is up
                    # (the relay's start reads it). A reset or hang-up ends it here.
                    if events & _SHUT:
                        self.down.final = True
                    if events & (EPOLLERR | EPOLLHUP):
                        self.close("peer left before the app connection was made")
                    elif events & EPOLLOUT and self.down.pending:
                        self.down.flush()
                    return
                self._on_app_connected(events)
        except (OSError, ssl.SSLError) as e:
            self._fail(e)

    def _before_handshake(self, events: int) -> None:
        if events & _SHUT:
            self.down.final = True  # its bytes wait in the kernel for the handshake's start
        if events & (EPOLLERR | EPOLLHUP):
            self.reactor.counters.fail(self.reactor.counters.handshake_failures, "eof")
            self.close("handshake failed: the peer closed the connection")
        elif self.state == "accepted" and events & _READ_EVENTS:
            if self.reactor.handshakes.take(self):
                self.begin_handshake()
            else:
                self.state = "waiting"

    def begin_handshake(self) -> None:
        self.state = "handshake"
        self.down.start_tls(self.ctx, server_side=True)
        try:
            # The client's first flight is already in the kernel: no new edge will say so.
            self._on_handshake_event(EPOLLIN | (EPOLLRDHUP if self.down.final else 0))
        except (OSError, ssl.SSLError) as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if self.state == "handshake":
            reason = _reason(e)
            self.reactor.counters.fail(self.reactor.counters.handshake_failures, _short(e))
            self.close(f"handshake failed: {reason}")
        else:
            self.close(_reason(e))

    def _on_handshake_event(self, events: int) -> None:
        down = self.down
        if events & EPOLLOUT and down.pending:
            down.flush()
        if not events & _READ_EVENTS:
            return
        alive = _feed(down, self.reactor, events)
        if not _handshake(down):
            if not alive:
                self.reactor.counters.fail(self.reactor.counters.handshake_failures, "eof")
                self.close("handshake failed: the peer closed the connection")
            return
        self._release()
        assert down.tls is not None
        verdict = peer_identity(down.tls, self.peers)
        self.peer = verdict
        answer = self.admit(self, verdict)
        if not answer.allowed or answer.target is None:
            # Nothing reaches the app: close now; the peer sees the connection end right
            # after its handshake (TLS 1.3 clients finish first).
            self.close(answer.reason)
            return
        self.label = answer.label
        self.state = "connect"
        self.deadline = time.monotonic() + self.timeouts.connect
        try:
            sock = _connect_nonblocking(answer.target)
        except OSError as e:
            self._app_failed(e)
            return
        self.app = End(sock)
        self.reactor.add(sock, self)

    def _on_app_connected(self, events: int) -> None:
        assert self.app is not None
        err = self.app.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._app_failed(OSError(err, os.strerror(err)))
            return
        if not events & EPOLLOUT:
            return
        self.state = "relay"
        self.deadline = 0.0
        self.pipe = Pipe(self.reactor, self.down, self.app, "inbound", self.close)
        self.reactor.rebind(self.down.fd, self.pipe)
        self.reactor.rebind(self.app.fd, self.pipe)
        self.pipe.start()

    def _app_failed(self, e: OSError) -> None:
        c = self.reactor.counters
        c.fail(c.upstream_connect_failures, "local_app")
        self.close(f"cannot reach the local app: {e.strerror or e}")

    def ends(self) -> tuple[End | None, ...]:
        return (self.down, self.app)

    def timed_out(self) -> str:
        # Waiting for the first bytes or a slot is part of the handshake's time.
        state = "handshake" if self.state in ("accepted", "waiting") else self.state
        return f"{state} timed out"


class Outbound(Connection):
    """A local client's connection to an upstream: pick an instance, connect, TLS handshake
    as this service, check the server is exactly the destination, then relay. A failed
    connect or handshake moves on to the next instance until the connect timeout."""

    __slots__ = (
        "attempts",
        "candidates",
        "closed",
        "ctx",
        "current",
        "deadline",
        "direction",
        "expect",
        "id",
        "label",
        "local",
        "on_end",
        "peers",
        "pipe",
        "reactor",
        "remote",
        "slot",
        "state",
        "timeouts",
        "tried",
    )

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        peers: PeerCache,
        candidates: Sequence[tuple[str, int]],
        expect: Callable[[PeerVerdict], str | None],
        timeouts: Timeouts,
        on_end: Callable[[Connection, str], None],
        label: Any = None,
    ) -> None:
        self.id = reactor.next_id()
        self.direction = "outbound"
        self.reactor = reactor
        self.local = End(sock)
        self.ctx = ctx
        self.peers = peers
        self.candidates = list(candidates)
        self.expect = expect
        self.timeouts = timeouts
        self.on_end = on_end
        self.label = label
        self.remote: End | None = None
        self.pipe: Pipe | None = None
        self.state = "connect"  # -> "waiting" (for a handshake slot) -> "handshake" -> "relay"
        self.slot = 0
        self.closed = False
        self.tried: list[str] = []
        self.current: tuple[str, int] = ("", 0)
        self.attempts = 0
        self.deadline = time.monotonic() + timeouts.connect
        reactor.connections[self.id] = self
        # The local client may write before the upstream is ready: its bytes wait in the
        # kernel until the relay starts (EPOLLET: the relay's start reads them).
        reactor.add(sock, self)
        self._next()

    def _next(self) -> None:
        """Try the next candidate instance."""
        if self.remote is not None:
            self.reactor.remove(self.remote.sock)
            self.remote.close()
            self.remote = None
        self._release()
        while self.candidates:
            address = self.candidates.pop(0)
            self.current = address
            self.attempts += 1
            try:
                sock = _connect_nonblocking(address)
            except OSError as e:
                self._note_failure("connect", e.strerror or str(e))
                continue
            self.state = "connect"
            self.remote = End(sock)  # TLS once connected and given a handshake slot
            self.reactor.add(sock, self)
            return
        self.close("no instance could be reached: " + "; ".join(self.tried or ["none healthy"]))

    def _note_failure(self, stage: str, why: str) -> None:
        c = self.reactor.counters
        c.fail(c.upstream_connect_failures, stage)
        host, port = self.current
        self.tried.append(f"{host}:{port} {stage}: {why}")

    def on_event(self, fd: int, events: int) -> None:
        # Once relaying, the pipe is its sockets' handler (``Reactor.rebind``).
        if fd == self.local.fd:
            if events & _SHUT:
                self.local.final = True  # its bytes and its end wait for the relay's start
            if events & (EPOLLERR | EPOLLHUP):
                self.close("the local client left before the upstream was reached")
            return
        remote = self.remote
        if remote is None or fd != remote.fd or self.state == "waiting":
            # Waiting for a handshake slot: whatever happened to the socket meanwhile, the
            # handshake's first write or read will find out.
            return
        self._step(remote, events)

    def begin_handshake(self) -> None:
        remote = self.remote
        assert remote is not None
        self._step(remote, EPOLLOUT)

    def _step(self, remote: End, events: int) -> None:
        try:
            if self.state == "connect":
                err = remote.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                if not events & EPOLLOUT:
                    return
                if not self.reactor.handshakes.take(self):
                    self.state = "waiting"
                    return
                self.state = "handshake"
                remote.start_tls(self.ctx, server_side=False)
                if not _handshake(remote):
                    return
            elif self.state == "waiting":  # the slot came (Handshakes.grant)
                self.state = "handshake"
                remote.start_tls(self.ctx, server_side=False)
                if not _handshake(remote):
                    return
            else:
                if events & EPOLLOUT and remote.pending:
                    remote.flush()
                if not events & _READ_EVENTS:
                    return
                alive = _feed(remote, self.reactor, events)
                if not _handshake(remote):
                    if not alive:
                        raise ConnectionResetError(errno.ECONNRESET, "closed during handshake")
                    return
        except (OSError, ssl.SSLError) as e:
            if self.state == "handshake":
                c = self.reactor.counters
                c.fail(c.handshake_failures, _short(e))
            self._note_failure(self.state, _reason(e))
            self._next()
            return
        self._release()
        assert remote.tls is not None
        verdict = peer_identity(remote.tls, self.peers)
        wrong = self.expect(verdict)
        if wrong is not None:
            # CVE-2021-32574: a server that is not the destination gets no byte.
            self._note_failure("identity", wrong)
            self._next()
            return
        self.state = "relay"
        self.deadline = 0.0
        log.debug("conn %d: upstream %s:%d reached", self.id, *self.current)
        self.pipe = Pipe(self.reactor, self.local, remote, "outbound", self.close)
        self.reactor.rebind(self.local.fd, self.pipe)
        self.reactor.rebind(remote.fd, self.pipe)
        self.pipe.start()

    def ends(self) -> tuple[End | None, ...]:
        return (self.local, self.remote)

    def timed_out(self) -> str:
        return "timed out reaching the upstream: " + "; ".join(self.tried or ["no answer"])


def _short(e: BaseException) -> str:
    """A low-cardinality label for metrics."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(e, ssl.SSLError):
        return (e.reason or "tls").lower()
    if isinstance(e, ConnectionResetError):
        return "reset"
    return "io"


class Listener:
    """A listening socket in the reactor: accepts until the kernel has no more, and hands
    each socket to ``on_accept`` (which may refuse it)."""

    __slots__ = ("on_accept", "reactor", "sock")

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        on_accept: Callable[[socket.socket, Any], None],
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.on_accept = on_accept
        sock.setblocking(False)
        reactor.add(sock, self, EPOLLIN | EPOLLET)

    def on_event(self, fd: int, events: int) -> None:
        accept = self.sock.accept
        while True:
            try:
                conn, addr = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the pending connections stay queued; stop here
                    # rather than spin (the next edge retries).
                    log.warning("cannot accept: %s", e.strerror)
                    return
                continue  # ECONNABORTED and the like: that client is gone, take the next
            conn.setblocking(False)
            nodelay(conn)
            self.on_accept(conn, addr)

    def close(self) -> None:
        self.reactor.remove(self.sock)
        self.sock.close()


def bind(address: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening socket. OSError with a message naming the address on failure."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {address}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock
