"""Connect CA endpoints: roots, configuration, CSR signing, rotation and agent leaves."""

from __future__ import annotations

import time

from flask import Blueprint, Response

from trellis.api.acl import service as acl
from trellis.api.ca.leaves import AgentLeaf, AgentLeaves, leaf_watch
from trellis.api.ca.manager import ROOTS_DOC, ROOTS_WATCH, WATCH, CAManager, SignedLeaf, _rfc3339
from trellis.api.catalog import valid_name
from trellis.api.http import (
    add_index_headers,
    blocking,
    flag,
    json_body,
    json_response,
    services,
)
from trellis.api.schemas import load
from trellis.api.schemas.ca import RotateSchema, SignSchema

bp = Blueprint("connect_ca", __name__)


def ca() -> CAManager:
    return services().ca


def _roots():
    data, index = blocking(ROOTS_WATCH, ca().roots_view)
    if flag("pem"):
        body = "".join(r["RootCert"] for r in data["Roots"])
        resp = Response(body, mimetype="application/pem-certificate-chain")
        add_index_headers(resp, index)
        return resp
    return json_response(data, index=index)


@bp.get("/v1/connect/ca/roots")
def roots():
    return _roots()


@bp.get("/v1/agent/connect/ca/roots")
def agent_roots():
    return _roots()


@bp.get("/v1/connect/ca/configuration")
def get_configuration():
    # Fix: operator:write, not operator:read, as Consul since 1.8.6/1.7.10/1.6.10: the
    # configuration is the CA's, and reading it was how CVE-2020-28053 leaked the private key
    # to operator:read tokens. Trellis never returns a secret here, but keeps Consul's rule.
    acl.require_operator(write=True)
    # Fix: watch every CA document (WATCH), not only the roots: a TTL-only change writes
    # ca/config alone, and a blocking read of the configuration slept through it.
    data, index = blocking(WATCH, ca().config_view)
    return json_response(data, index=index)


@bp.put("/v1/connect/ca/configuration")
def put_configuration():
    acl.require_operator(write=True)
    ca().set_config(json_body())
    return json_response(True)


@bp.post("/v1/connect/ca/rotate")
def rotate():
    acl.require_operator(write=True)
    body = load(RotateSchema, json_body(required=False) or {})
    ca().rotate(force=body["force"])
    data, index = ca().roots_view()
    return json_response(data, index=index)


def may_sign(service: str) -> bool:
    """Whether the request's token may obtain a certificate for ``service``: ``service:write``
    on it (with ACLs off, as in Consul, any caller may). ``CAManager.sign_csr`` asks it about
    the identity a CSR names once the CSR has passed the policy, and answers False with 403
    Permission denied, as Consul does (ConnectCA.Sign); an unknown token is a 403 from here."""
    return acl.current().service_write(service)


def leaf_json(leaf: SignedLeaf, index: int, key_pem: str = "") -> dict:
    return {
        "SerialNumber": leaf.serial,
        "CertPEM": leaf.cert_pem,
        "PrivateKeyPEM": key_pem,
        "Service": leaf.identity.service,
        "ServiceURI": leaf.identity.uri,
        "RootID": leaf.root_id,
        "ValidAfter": _rfc3339(leaf.cert.not_valid_before_utc),
        "ValidBefore": _rfc3339(leaf.cert.not_valid_after_utc),
        "Namespace": leaf.identity.namespace,
        "CreateIndex": index,
        "ModifyIndex": index,
    }


@bp.post("/v1/connect/ca/sign")
def sign():
    """Sign a CSR: the path for sidecars and native apps, whose keys never leave them."""
    body = load(SignSchema, json_body())
    leaf = ca().sign_csr(body["CSR"], may_sign)
    # The index of the roots the leaf was signed under: no extra store read per signing.
    _, index = ca().roots_index()
    return json_response(leaf_json(leaf, index))


# -- agent leaves (Consul's /v1/agent/connect/ca/leaf/<service>) --------------------------------


@bp.get("/v1/agent/connect/ca/leaf/<service>")
def agent_leaf(service: str):
    """The service's leaf and key, one per service for the cluster (``trellis.api.ca.leaves``).
    Blocking with ``?index=``: answers when the leaf changes (renewed, or re-issued under a new
    root), which a parked query also checks at the leaf's renewal time."""
    valid_name("service name", service)
    acl.require_service_write(service)
    leaves: AgentLeaves = services().leaves

    def compute() -> tuple[AgentLeaf, int]:
        leaf = leaves.get(service, may_sign)
        return leaf, leaf.index

    leaf, index = blocking(
        leaf_watch(service, ROOTS_DOC),
        compute,
        due_in=lambda got: got[0].renew_in(time.time()),
    )
    return json_response(leaf_json(leaf.signed, index, leaf.key_pem), index=index)
