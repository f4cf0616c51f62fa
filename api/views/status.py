"""``/v1/status/*``: Trellis has no Raft; every server is its own leader, and the store is
the source of truth, so both answers name this server's address."""

from __future__ import annotations

from flask import Blueprint

from trellis.api.http import json_response, services

bp = Blueprint("status", __name__)


def _addr() -> str:
    s = services().settings
    return f"{s.node_address}:8300"


@bp.get("/v1/status/leader")
def leader():
    return json_response(_addr())


@bp.get("/v1/status/peers")
def peers():
    return json_response([_addr()])
