"""A Flask app in the mesh, with no sidecar: gunicorn serves it over the SDK's mutual TLS
(gunicorn.conf.py), ``ConnectMiddleware`` answers 403 to any peer the intentions do not
allow before a view runs, and the views call other services through the SDK.

* ``GET /``: who called (the peer's service name and SPIFFE ID, from the middleware);
* ``GET /call/<service>?text=...``: sends ``text`` as one line to ``<service>`` over Connect
  (``Service.connect``: a verified mutual-TLS socket to a healthy instance) and returns the
  line it answers; the trio backend (examples/trio-backend) and the sidecar-fronted app of
  examples/interop both speak that line protocol.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from trellis.connect import ConnectError
from trellis.connect.wsgi import PEER_ID, PEER_SERVICE, ConnectMiddleware, worker_service

app = Flask(__name__)
# The WorkerService gunicorn.conf.py made: called, it gives this worker's Service.
web = worker_service("web")
app.wsgi_app = ConnectMiddleware(app.wsgi_app, web)  # type: ignore[method-assign]


def error(message: str, status: int):
    return jsonify(error=message, code="bad_gateway", status=status), status


@app.get("/")
def hello():
    return jsonify(
        service="web",
        peer=request.environ[PEER_SERVICE],
        peer_id=request.environ[PEER_ID],
        pid=os.getpid(),
    )


@app.get("/call/<name>")
def call(name: str):
    text = request.args.get("text", "hello")
    if "\n" in text or len(text) > 1000:
        return jsonify(
            error="text: one line of at most 1000 characters", code="bad_request", status=400
        ), 400
    try:
        with web().connect(name, timeout=10) as sock:
            sock.settimeout(10)
            sock.sendall(text.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except ValueError as e:  # not a service name
        return jsonify(error=str(e), code="bad_request", status=400), 400
    except (ConnectError, OSError, TimeoutError) as e:
        return error(str(e), 502)
    if not reply.endswith(b"\n"):
        # A server that refuses web (an intention denies it) closes before answering.
        return error(f"{name} closed the connection without answering (refused?)", 502)
    return jsonify(service=name, reply=reply.decode(errors="replace").rstrip("\n"))
