"""Connect CA endpoints: roots, configuration, CSR signing, rotation and agent leaves."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Response

from trellis.api.acl import service as acl
from trellis.api.ca.manager import ROOTS_WATCH, WATCH, CAManager, SignedLeaf, _rfc3339
from trellis.api.catalog import valid_name
from trellis.api.http import (
    add_index_headers,
    blocking,
    flag,
    json_body,
    json_response,
    services,
    uint_arg,
    wait_arg,
)
from trellis.api.schemas import load
from trellis.api.schemas.ca import RotateSchema, SignSchema
from trellis.proxy import renewal, spiffe
from trellis.proxy import x509 as px

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
    body = load(RotateSchema(), json_body(required=False) or {})
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
    body = load(SignSchema(), json_body())
    leaf = ca().sign_csr(body["CSR"], may_sign)
    # The index of the roots the leaf was signed under: no extra store read per signing.
    _, index = ca().roots_index()
    return json_response(leaf_json(leaf, index))


# -- agent leaves (Consul's /v1/agent/connect/ca/leaf/<service>) --------------------------------


@dataclass
class _Leaf:
    signed: SignedLeaf
    key_pem: str
    index: int
    renew_at: float


class LeafCache:
    """Leaves this server process issued through the agent endpoint, one per service.

    The agent endpoint makes the key on the server (as Consul's agent does on its node) for
    Consul clients; sidecars and native apps use ``/v1/connect/ca/sign`` and keep their keys.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leaves: dict[str, _Leaf] = {}
        self._index = 0

    def get(self, service: str, manager: CAManager, key_type: str, key_bits: int) -> _Leaf:
        roots, _ = manager.roots_view()
        with self._lock:
            cur = self._leaves.get(service)
        now = time.time()
        if cur is not None and cur.signed.root_id == roots["ActiveRootID"]:
            nb = cur.signed.cert.not_valid_before_utc.timestamp()
            na = cur.signed.cert.not_valid_after_utc.timestamp()
            if not renewal.due(now, nb, na, cur.renew_at):
                return cur
        key = px.generate_key(key_type, key_bits)
        ident = spiffe.service_id(manager.trust_domain, manager.datacenter, service)
        csr = px.build_csr(key, ident)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        signed = manager.sign_csr(csr_pem, may_sign)
        nb = signed.cert.not_valid_before_utc.timestamp()
        na = signed.cert.not_valid_after_utc.timestamp()
        with self._lock:
            self._index = max(self._index + 1, services().store.current_index())
            leaf = _Leaf(signed, px.key_pem(key), self._index, renewal.plan(nb, na))
            self._leaves[service] = leaf
        return leaf


@bp.get("/v1/agent/connect/ca/leaf/<service>")
def agent_leaf(service: str):
    valid_name("service name", service)
    acl.require_service_write(service)
    manager = ca()
    _, _, config, _ = manager._state()
    cfg = config["Config"]
    cache: LeafCache = services().leaves
    min_index = uint_arg("index") or 0
    wait = wait_arg()
    feed = services().store.feed
    deadline = time.monotonic() + wait
    while True:
        pos = feed.position()
        leaf = cache.get(service, manager, cfg["PrivateKeyType"], cfg["PrivateKeyBits"])
        remaining = deadline - time.monotonic()
        if not min_index or leaf.index > min_index or remaining <= 0:
            return json_response(leaf_json(leaf.signed, leaf.index, leaf.key_pem), index=leaf.index)
        until_renewal = max(0.0, leaf.renew_at - time.time())
        # Wake for a root change, or when the leaf falls due for renewal.
        feed.wait(ROOTS_WATCH, pos, min(remaining, until_renewal + 0.01))
