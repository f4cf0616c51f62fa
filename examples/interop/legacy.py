"""A service that knows nothing of the mesh: plain TCP on the loopback, fronted by a
``trellis connect proxy`` sidecar that does its mutual TLS and intentions.

The protocol is the trio backend's: one line in, ``legacy: <the line, upper-cased>`` out.

    python examples/interop/legacy.py -port 9400
"""

from __future__ import annotations

import argparse
import os
import socketserver
import sys

MAX_LINE = 64 * 1024


class Lines(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while line := self.rfile.readline(MAX_LINE):
            self.wfile.write(b"legacy: " + line.rstrip(b"\n").upper() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    args = p.parse_args(argv)
    with Server(("127.0.0.1", args.port), Lines) as server:
        port = server.server_address[1]
        print(f"legacy: serving plain TCP on 127.0.0.1:{port} (pid {os.getpid()})", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
