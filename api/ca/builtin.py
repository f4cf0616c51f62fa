"""The built-in CA provider: keys made with ``cryptography``, kept in the store, sealed.

The root signs leaves directly (there is no intermediate: the key never leaves the control
plane, and an intermediate would only add a certificate to every handshake). The root's private
key is sealed with AES-256-GCM under a key from the server's configuration before it reaches
the store (see ``trellis.api.ca.secrets``), so a copy of the database alone yields no CA key.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from cryptography import x509

from trellis.api.ca.provider import CAOptions, ProviderError, RootMaterial
from trellis.proxy import x509 as px


class KeyStore(Protocol):
    """Where the built-in provider keeps private keys (sealed by the implementation)."""

    def put_key(self, key_id: str, pem: str) -> None: ...
    def get_key(self, key_id: str) -> str: ...
    def delete_key(self, key_id: str) -> None: ...


class BuiltinProvider:
    name = "builtin"

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys
        self._options: CAOptions | None = None
        self._custom: tuple[x509.Certificate, px.PrivateKey] | None = None
        self._root: x509.Certificate | None = None
        self._key: px.PrivateKey | None = None

    @property
    def options(self) -> CAOptions:
        if self._options is None:
            raise ProviderError("the built-in CA is not configured")
        return self._options

    def configure(self, options: CAOptions, config: Mapping[str, Any]) -> None:
        self._options = options
        pem_key, pem_cert = config.get("PrivateKey"), config.get("RootCert")
        if bool(pem_key) != bool(pem_cert):
            raise ProviderError("PrivateKey and RootCert must be given together")
        if pem_key and pem_cert:
            self._custom = self._check_custom_root(str(pem_cert), str(pem_key), options)

    @staticmethod
    def _check_custom_root(
        pem_cert: str, pem_key: str, options: CAOptions
    ) -> tuple[x509.Certificate, px.PrivateKey]:
        """An operator's own root must be a SPIFFE signing certificate of our trust domain."""
        try:
            certs = px.load_certs(pem_cert)
            key = px.load_key(pem_key)
        except (px.PolicyError, ValueError, TypeError) as e:
            raise ProviderError(f"RootCert/PrivateKey do not parse: {e}") from None
        if len(certs) != 1:
            raise ProviderError("RootCert must hold exactly one certificate")
        cert = certs[0]
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ProviderError("RootCert is not a CA certificate")
        if cert.public_key() != key.public_key():
            raise ProviderError("PrivateKey does not match RootCert")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        want = f"spiffe://{options.trust_domain}"
        if uris != [want]:
            raise ProviderError(f"RootCert must carry exactly the URI SAN {want}")
        try:
            px.key_description(key)
        except px.PolicyError as e:
            raise ProviderError(str(e)) from None
        return cert, key

    def generate_root(self) -> RootMaterial:
        opts = self.options
        if self._custom is not None:
            cert, key = self._custom
        else:
            try:
                key = px.generate_key(opts.key_type, opts.key_bits)
            except px.PolicyError as e:
                raise ProviderError(str(e)) from None
            short = uuid.uuid4().hex[:8]
            cert = px.build_ca(
                public_key=key.public_key(),
                trust_domain=opts.trust_domain,
                common_name=f"Trellis CA {short}",
                signer_key=key,
                signer=None,
                ttl=opts.root_ttl,
            )
        key_id = "builtin-" + px.fingerprint(cert)[:32]
        self._keys.put_key(key_id, px.key_pem(key))
        self._root, self._key = cert, key
        return RootMaterial(cert=cert, signing_chain=(), state={"KeyID": key_id})

    def load_root(self, cert: x509.Certificate, state: Mapping[str, Any]) -> None:
        key_id = state.get("KeyID")
        if not isinstance(key_id, str):
            raise ProviderError("the built-in root's state names no key")
        key = px.load_key(self._keys.get_key(key_id))
        if key.public_key() != cert.public_key():
            raise ProviderError("the stored key does not match the root certificate")
        self._root, self._key = cert, key

    def check(self) -> None:
        """Nothing to ask: the keys are in the store, and ``configure`` checked a custom root."""

    def _signer(self) -> tuple[x509.Certificate, px.PrivateKey]:
        if self._root is None or self._key is None:
            raise ProviderError("the built-in CA has no root loaded")
        return self._root, self._key

    def sign_leaf(
        self, csr_pem: str, info: px.CSRInfo, ttl: dt.timedelta
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        root, key = self._signer()
        try:
            return px.build_leaf(info, issuer=root, issuer_key=key, ttl=ttl), ()
        except px.PolicyError as e:
            raise ProviderError(str(e)) from None

    def supports_cross_signing(self) -> bool:
        return True

    def cross_sign(self, new_root: x509.Certificate) -> x509.Certificate:
        root, key = self._signer()
        return px.cross_sign(
            new_root, old_root=root, old_key=key, trust_domain=self.options.trust_domain
        )

    def cleanup(self, state: Mapping[str, Any]) -> None:
        key_id = state.get("KeyID")
        if isinstance(key_id, str):
            self._keys.delete_key(key_id)
