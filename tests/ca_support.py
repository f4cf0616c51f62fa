"""Helpers of the Connect CA tests: CSRs (good and deliberately bad), certificates from API
bodies, and the two ways a peer's chain is judged (``trellis.proxy.x509.verify_peer`` and the
``openssl verify`` command line)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from trellis.proxy import spiffe
from trellis.proxy import x509 as px

DC = "dc1"
COLON_HEX = r"[0-9a-f]{2}(?::[0-9a-f]{2})*"
RFC3339 = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"


def to_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(Encoding.PEM).decode()


def service_csr(trust_domain: str, service: str, key: px.PrivateKey | None = None) -> str:
    """A CSR as a sidecar sends it, for ``service`` in this cluster."""
    key = key or px.generate_key()
    return to_pem(px.build_csr(key, spiffe.service_id(trust_domain, DC, service)))


def custom_csr(
    key,
    uris: Sequence[str] = (),
    *,
    dns: Sequence[str] = (),
    ca: bool = False,
    key_cert_sign: bool = False,
) -> str:
    """A CSR with whatever SANs and extensions a test wants (the policy must refuse most)."""
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if key_cert_sign:
        ku = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        b = b.add_extension(ku, critical=True)
    algorithm = None if _is_edwards(key) else hashes.SHA256()
    return to_pem(b.sign(key, algorithm))


def _is_edwards(key) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    return isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


def certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def leaf_and_chain(issued: dict) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """An ``IssuedCert`` body's leaf and the intermediates sent with it."""
    chain = certs(issued["CertPEM"])
    return chain[0], chain[1:]


def root_by_id(roots: dict) -> dict[str, x509.Certificate]:
    return {r["ID"]: certs(r["RootCert"])[0] for r in roots["Roots"]}


def peer_ok(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
    trust_domain: str,
) -> bool:
    """Whether a sidecar trusting ``bundle`` accepts this peer
    (``trellis.proxy.x509.verify_peer``)."""
    try:
        px.verify_peer([leaf, *chain], {trust_domain: list(bundle)})
    except px.PeerRejected:
        return False
    return True


def openssl_ok(
    tmp: Path,
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
) -> bool:
    """``openssl verify -CAfile bundle.pem -untrusted chain.pem leaf.pem`` succeeds."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "bundle.pem").write_text("".join(px.cert_pem(c) for c in bundle))
    (tmp / "leaf.pem").write_text(px.cert_pem(leaf))
    cmd = ["openssl", "verify", "-CAfile", str(tmp / "bundle.pem")]
    if chain:
        (tmp / "chain.pem").write_text("".join(px.cert_pem(c) for c in chain))
        cmd += ["-untrusted", str(tmp / "chain.pem")]
    cmd.append(str(tmp / "leaf.pem"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    ok = r.returncode == 0
    # Both ways of failing must agree: a zero status always says "OK", a failure never does.
    assert ok == r.stdout.strip().endswith(": OK"), (r.returncode, r.stdout, r.stderr)
    return ok


class GatedProvider:
    """A CA provider whose ``sign_leaf`` calls ``on_enter`` and then waits at ``gate``: a slow
    CA, injected, so a test can hold signings in flight (the rest goes to ``inner``)."""

    def __init__(self, inner, on_enter, gate) -> None:
        self._inner = inner
        self._on_enter = on_enter
        self._gate = gate

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sign_leaf(self, csr_pem, info, ttl):
        self._on_enter()
        assert self._gate.wait(10), "the test never opened the gate"
        return self._inner.sign_leaf(csr_pem, info, ttl)
