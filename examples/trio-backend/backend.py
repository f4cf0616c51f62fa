"""A raw-TCP trio service in the mesh, with no sidecar: ``Service.serve_connect`` accepts,
does the mutual-TLS handshake with the service's own leaf, authorizes each peer by
intentions, and runs ``answer`` for allowed peers only (a denied peer is closed before a byte
is read).

The protocol: one line in, one line out, for as many lines as the client sends:
``backend: <the line, upper-cased>``.

    python examples/trio-backend/backend.py -port 9300 -register

``-register`` puts the service in the catalog as Connect-native (with a TTL check it keeps
passing) and takes it out at exit; without it, register it yourself (see the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import httpx
import trio

from trellis.connect import open_service

NAME = "backend"
MAX_LINE = 64 * 1024


async def answer(stream: trio.abc.Stream) -> None:
    """One connection from an allowed peer: a reply per line until the peer closes."""
    buf = b""
    while data := await stream.receive_some(65536):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            await stream.send_all(b"backend: " + line.upper() + b"\n")
        if len(buf) > MAX_LINE:
            return  # a line that never ends: the client's fault, and not ours to buffer


def registration(name: str, port: int) -> dict:
    return {
        "Name": name,
        "ID": f"{name}-{port}",
        "Address": "127.0.0.1",
        "Port": port,
        "Connect": {"Native": True},
        "Check": {"CheckID": f"{name}-{port}-alive", "TTL": "30s", "Status": "passing"},
    }


async def put(client: httpx.AsyncClient, path: str, body: dict | None = None) -> None:
    r = await client.put(path, json=body)
    r.raise_for_status()


async def keep_passing(client: httpx.AsyncClient, check_id: str) -> None:
    while True:
        await trio.sleep(10)
        try:
            await put(client, f"/v1/agent/check/pass/{check_id}")
        except httpx.HTTPError as e:
            logging.warning("%s: could not refresh the TTL check: %s", NAME, e)


async def main(args: argparse.Namespace) -> None:
    async with open_service(NAME, address=args.http_addr, token=args.token) as svc:
        await trio.to_thread.run_sync(svc.ready)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(svc.serve_connect, answer, args.port)
            port = listeners[0].socket.getsockname()[1]
            print(f"backend: serving Connect on 127.0.0.1:{port} (pid {os.getpid()})", flush=True)
            headers = {"X-Consul-Token": args.token} if args.token else {}
            async with httpx.AsyncClient(
                base_url=args.http_addr, headers=headers, timeout=10
            ) as client:
                body = registration(NAME, port)
                if args.register:
                    await put(client, "/v1/agent/service/register", body)
                    nursery.start_soon(keep_passing, client, body["Check"]["CheckID"])
                    print(f"backend: registered as {body['ID']}", flush=True)
                try:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for _ in signals:
                            break
                finally:
                    if args.register:
                        with trio.CancelScope(shield=True):
                            await put(client, f"/v1/agent/service/deregister/{body['ID']}")
                    nursery.cancel_scope.cancel()
    print("backend: stopped", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-port", type=int, default=0, help="port to serve on (0: any free one)")
    p.add_argument(
        "-http-addr",
        default=os.environ.get("TRELLIS_HTTP_ADDR", "http://127.0.0.1:8500"),
        help="the Trellis HTTP API (default: $TRELLIS_HTTP_ADDR or %(default)s)",
    )
    p.add_argument("-token", default=os.environ.get("TRELLIS_HTTP_TOKEN"))
    p.add_argument("-register", action="store_true", help="register (and deregister at exit)")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    trio.run(main, parse(sys.argv[1:]))
