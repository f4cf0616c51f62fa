"""A stand-in for the node agent in the supervisor's integration tests: a process that runs a
``Supervisor`` with the real launcher and nothing else.

Each line on stdin is the whole desired set, as JSON ``{proxy_id: {"service_id", "args",
"env"}}``. SIGTERM or the end of stdin stops every sidecar (``stop_all``) and exits. The
supervisor's log (and the sidecars' output it forwards) goes to stdout, one message a line,
after a first line ``harness ready <pid>``.

Run as ``python tests/supervisor_harness.py``; it imports only ``trellis``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import trio

from trellis.proxy.agent.ports import SidecarSpec
from trellis.proxy.agent.supervisor import Supervisor


def specs(line: bytes) -> dict[str, SidecarSpec]:
    doc = json.loads(line)
    return {
        pid: SidecarSpec(
            proxy_id=pid, service_id=s["service_id"], args=tuple(s["args"]), env=s.get("env", {})
        )
        for pid, s in doc.items()
    }


async def main() -> None:
    sup = Supervisor(backoff=(1.0, 30.0), stop_grace=5.0)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            print(f"harness ready {os.getpid()}", flush=True)
            done = trio.Event()

            async def read_updates() -> None:
                buf = b""
                while chunk := await stdin.receive_some(65536):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            sup.update(specs(line))
                done.set()

            async def on_signal() -> None:
                async for _ in signals:
                    done.set()
                    return

            nursery.start_soon(read_updates)
            nursery.start_soon(on_signal)
            await done.wait()
            await sup.stop_all()
            print("harness stopped", flush=True)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    trio.run(main)
