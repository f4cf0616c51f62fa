"""``/v1/openapi.yaml``: the contract of this API, served by the API itself."""

from __future__ import annotations

from flask import Blueprint, Response

bp = Blueprint("spec", __name__)


@bp.get("/v1/openapi.yaml")
def openapi():
    from trellis.api.app import SPEC_PATH

    return Response(SPEC_PATH.read_bytes(), mimetype="application/yaml")
