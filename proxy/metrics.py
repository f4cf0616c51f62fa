"""Prometheus metrics of a proxy, read from its plain counters at scrape time.

The byte path counts with plain ints (``trellis.proxy.reactor.Counters``): a
``prometheus_client`` counter costs a lock per increment, too much per read and write. A custom
collector turns the ints into metric families when Prometheus scrapes, and ``serve`` answers
``GET /metrics`` over HTTP/1.0 in a trio task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from trellis.proxy.sidecar import Sidecar

log = logging.getLogger("trellis.proxy")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SidecarCollector(Collector):
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def collect(self) -> Iterator[Any]:
        sc = self.sidecar
        c = sc.reactor.counters
        service = sc.snapshot.identity.service if sc.snapshot else ""
        opened = CounterMetricFamily(
            "trellis_proxy_connections", "Connections accepted, by direction", labels=["direction"]
        )
        open_ = GaugeMetricFamily(
            "trellis_proxy_connections_open", "Connections open now", labels=["direction"]
        )
        for d in ("inbound", "outbound"):
            opened.add_metric([d], c.opened[d])
            open_.add_metric([d], c.open[d])
        yield opened
        yield open_
        rx = CounterMetricFamily(
            "trellis_proxy_received_bytes",
            "Plaintext bytes received from the connection's initiator, by direction",
            labels=["direction"],
        )
        tx = CounterMetricFamily(
            "trellis_proxy_sent_bytes",
            "Plaintext bytes sent back to the connection's initiator, by direction",
            labels=["direction"],
        )
        for d in ("inbound", "outbound"):
            rx.add_metric([d], c.bytes_in[d])
            tx.add_metric([d], c.bytes_out[d])
        yield rx
        yield tx
        yield _counted(
            "trellis_proxy_handshake_failures",
            "Failed TLS handshakes, by reason",
            "reason",
            c.handshake_failures,
        )
        yield _counted(
            "trellis_proxy_upstream_connect_failures",
            "Failed attempts to reach an upstream instance (or the local app), by stage",
            "stage",
            c.upstream_connect_failures,
        )
        authz = CounterMetricFamily(
            "trellis_proxy_authorizations",
            "Authorization decisions on inbound connections, by source service and result",
            labels=["source", "result"],
        )
        for (source, result), n in sorted(sc.decisions.items()):
            authz.add_metric([source, result], n)
        yield authz
        yield CounterMetricFamily(
            "trellis_proxy_refused_over_limit",
            "New connections refused because the maximum was open",
            value=c.refused_over_limit,
        )
        leaf = GaugeMetricFamily(
            "trellis_proxy_leaf_expiry_seconds",
            "Seconds until this proxy's certificate expires",
            labels=["service"],
        )
        snap = sc.snapshot
        if snap is not None and snap.leaf is not None:
            leaf.add_metric([service], snap.leaf.not_after - time.time())
        yield leaf
        yield GaugeMetricFamily(
            "trellis_proxy_control_plane_connected",
            "1 when the control plane answers, 0 while the proxy serves from what it holds",
            value=1 if sc.follower.connected else 0,
        )


def _counted(name: str, doc: str, label: str, table: dict[str, int]) -> CounterMetricFamily:
    """A counter family from a table of counts by one label's value."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(table.items()):
        family.add_metric([value], n)
    return family


def registry_for(sidecar: Sidecar) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SidecarCollector(sidecar))
    return reg


async def serve(listener: trio.SocketListener, registry: CollectorRegistry) -> None:
    """Answer ``GET /metrics`` (and ``GET /``) on ``listener`` until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    request += data
                line = request.split(b"\r\n", 1)[0].split()
                if (
                    len(line) >= 2
                    and line[0] == b"GET"
                    and line[1].split(b"?")[0]
                    in (
                        b"/metrics",
                        b"/",
                    )
                ):
                    body = generate_latest(registry)
                    head = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\n"
                else:
                    body = b"not found\n"
                    head = "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                await stream.send_all(head.encode() + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the scraper went away
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, [listener])
