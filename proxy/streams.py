"""Connect over trio streams: the same handshake, identity check and admission as the
sidecar's byte path, on any ``trio.abc.Stream``.

The sidecar moves bytes in its own reactor (``trellis.proxy.reactor``), over raw sockets, for
speed. Everything it *decides* is shared with this module: the TLS contexts of the snapshot
(``trellis.proxy.tls``), the verdict on the peer's leaf (``peer_identity``), the admission and
the upstream identity check (``Snapshot.admit``, ``Snapshot.check_upstream``). Here they run
over ``trio.SSLStream``, which makes the whole mutual-TLS exchange testable on
``trio.testing.memory_stream_pair`` with no socket, and gives trio applications (the native
SDK) streams that behave like the sidecar.
"""

from __future__ import annotations

import trio

from trellis.proxy.snapshot import Admission, Snapshot
from trellis.proxy.tls import peer_identity

CHUNK = 65536


class PeerRefused(Exception):
    """The peer completed a handshake but is not who it must be (an upstream connection to a
    server that is not the destination). The peer is at fault; nothing was sent to it."""


async def accept(stream: trio.abc.Stream, snap: Snapshot) -> tuple[trio.SSLStream, Admission]:
    """The server side: handshake (client certificate required), then the admission.

    The caller relays only if ``admission.allowed``, and otherwise closes the stream.
    trio.BrokenResourceError: the handshake failed (no, or an unverifiable, certificate).
    """
    assert snap.tls is not None
    tls_stream = trio.SSLStream(stream, snap.tls.server, server_side=True)
    await _handshake(tls_stream)
    verdict = peer_identity(tls_stream, snap.tls.peers)  # type: ignore[arg-type]
    return tls_stream, snap.admit(verdict)


async def dial(
    stream: trio.abc.Stream, snap: Snapshot, destination: str, datacenter: str = ""
) -> trio.SSLStream:
    """The client side: handshake as this snapshot's service, then require the server to be
    exactly ``destination``. PeerRefused otherwise (the stream is closed);
    trio.BrokenResourceError if the handshake failed."""
    assert snap.tls is not None
    tls_stream = trio.SSLStream(stream, snap.tls.client, server_hostname=None)
    await _handshake(tls_stream)
    problem = snap.check_upstream(
        peer_identity(tls_stream, snap.tls.peers),  # type: ignore[arg-type]
        destination,
        datacenter,
    )
    if problem is not None:
        await trio.aclose_forcefully(tls_stream)
        raise PeerRefused(problem)
    return tls_stream


async def _handshake(tls_stream: trio.SSLStream) -> None:
    """Handshake; on failure close the transport too, so that the peer learns at once."""
    try:
        await tls_stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls_stream)
        raise


async def _copy(src: trio.abc.ReceiveStream, dst: trio.abc.Stream) -> None:
    while True:
        data = await src.receive_some(CHUNK)
        if not data:
            break
        await dst.send_all(data)
    # Half-close where the stream can (TCP, memory pairs); TLS closes the whole stream.
    send_eof = getattr(dst, "send_eof", None)
    if send_eof is not None:
        try:
            await send_eof()
        except trio.ClosedResourceError:
            pass


async def relay(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Copy both ways until both directions end (or one breaks); close both."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, a, b)
            nursery.start_soon(_copy, b, a)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
