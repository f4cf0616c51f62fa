"""A test CA and snapshots for data-plane tests: real keys and certificates, made in process.

``MeshCA`` issues leaves exactly as the Connect CA does (``trellis.proxy.x509.build_leaf``)
and, for the refusal cases, the certificates no CA of ours would issue: self-signed, signed
by a leaf, expired, with two URI SANs, of another trust domain. ``snapshot`` turns a leaf into
the ``Snapshot`` a follower would publish (with real SSL contexts), so the tests exercise the
same contexts, verdicts and admissions as the sidecar.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from trellis.proxy import authz, spiffe, tls
from trellis.proxy import x509 as px
from trellis.proxy.config import ProxyConfig
from trellis.proxy.follower import TLSMaterial, leaf_from_json, roots_from_json
from trellis.proxy.snapshot import Snapshot

DC = "dc1"
TD = "8c1e5a2e-0b7e-4f4e-9d2a-3b5f6f1d2c9a.trellis"
HOUR = dt.timedelta(hours=1)


@dataclass
class Issued:
    key: px.PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> str:
        return px.cert_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return px.key_pem(self.key)


class MeshCA:
    def __init__(self, trust_domain: str = TD) -> None:
        self.trust_domain = trust_domain
        self.key = px.generate_key()
        self.root = px.build_ca(
            public_key=self.key.public_key(),
            trust_domain=trust_domain,
            common_name="Trellis Test CA",
            signer_key=self.key,
            signer=None,
            ttl=dt.timedelta(days=30),
        )

    @property
    def root_pem(self) -> str:
        return px.cert_pem(self.root)

    def roots_json(self, *extra: MeshCA) -> dict:
        """``/v1/connect/ca/roots`` as the server answers it."""
        cas = [self, *extra]
        return {
            "ActiveRootID": "root-0",
            "TrustDomain": self.trust_domain,
            "Roots": [
                {"ID": f"root-{i}", "RootCert": ca.root_pem, "IntermediateCerts": []}
                for i, ca in enumerate(cas)
            ],
        }

    def leaf(self, service: str, *, ttl: dt.timedelta = HOUR, dc: str = DC) -> Issued:
        key = px.generate_key()
        info = px.CSRInfo(
            spiffe.service_id(self.trust_domain, dc, service), key.public_key(), "ec", 256
        )
        return Issued(key, px.build_leaf(info, issuer=self.root, issuer_key=self.key, ttl=ttl))

    def odd_leaf(
        self,
        uris: Sequence[str],
        *,
        signer: Issued | None = None,
        self_signed: bool = False,
        not_after: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """A leaf none of our CAs would issue, signed by this CA (or ``signer``, or itself)."""
        key = px.generate_key()
        now = dt.datetime.now(dt.UTC)
        issuer_key = key if self_signed else (signer.key if signer else self.key)
        issuer_name = (
            x509.Name([]) if self_signed else (signer.cert.subject if signer else self.root.subject)
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(px.new_serial())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + HOUR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if uris:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=True,
            )
        cert = b.sign(issuer_key, hashes.SHA256())
        chain = (signer.cert,) if signer else ()
        return Issued(key, cert, chain)

    def uri(self, service: str, dc: str = DC) -> str:
        return spiffe.service_id(self.trust_domain, dc, service).uri


def snapshot(
    ca: MeshCA,
    service: str,
    *,
    issued: Issued | None = None,
    intentions: Sequence[tuple[str, str, str]] = (),
    default_allow: bool = False,
    trusted: Sequence[MeshCA] = (),
    config: ProxyConfig | None = None,
) -> Snapshot:
    """The snapshot a follower of ``service`` would publish, with ``issued`` as its leaf
    (a fresh leaf from ``ca`` by default) and ``intentions`` as (source, destination, action).
    ``trusted`` adds other CAs' roots to the bundle (a misconfiguration some tests need)."""
    issued = issued or ca.leaf(service)
    leaf = leaf_from_json(
        {"CertPEM": issued.cert_pem + "".join(px.cert_pem(c) for c in issued.chain)}
    )
    roots = roots_from_json(ca.roots_json(*trusted), 1)
    material = dict(
        cert_pem=leaf.cert_pem,
        chain_pem=leaf.chain_pem,
        key_pem=issued.key_pem,
        roots_pem=roots.pems,
    )
    iset = authz.IntentionSet(authz.Intention(s, d, a) for s, d, a in intentions)
    return Snapshot(
        identity=spiffe.service_id(ca.trust_domain, DC, service),
        config=config or ProxyConfig(service=service),
        leaf=leaf,
        roots=roots,
        intentions=iset,
        default_allow=default_allow,
        tls=TLSMaterial(
            key_pem=issued.key_pem,
            server=tls.server_context(**material),
            client=tls.client_context(**material),
            peers=tls.PeerCache(),
        ),
    )
