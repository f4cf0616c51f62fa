"""The CA provider interface, modelled on Consul's ``agent/connect/ca/provider.go``.

A provider holds (or reaches) the keys; the CA manager (``trellis.api.ca.manager``) decides when to
make roots, rotate, cross-sign and prune, and keeps the public record of every root in the
store. Both providers run every CSR through the same pure policy (``trellis.proxy.x509.check_csr``)
before they sign anything, so a provider cannot be talked into signing what the policy refuses.

Provider *state* (``ProviderState``) is what a provider needs to find its keys again after a
restart or on another replica. It is stored beside the roots and shown to operators, so it
never holds a secret: the built-in provider's keys live in the store encrypted, under an ID
that the state names; Vault's keys never leave Vault.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from trellis.proxy.x509 import CSRInfo


class ProviderError(Exception):
    """The provider could not do what was asked (Vault down, refused, misconfigured).

    ``retryable`` says whether the same call may succeed later (a timeout, a 5xx) or needs an
    operator (a bad token, a missing mount).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class RootMaterial:
    """A root as a provider made it: the certificate, and where its key lives."""

    cert: x509.Certificate
    #: Certificates between the root and the leaves this provider signs (Vault's intermediate).
    signing_chain: tuple[x509.Certificate, ...] = ()
    #: Non-secret provider state needed to use this root later (mount paths, key IDs...).
    state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CAOptions:
    """The provider-independent part of the CA configuration."""

    trust_domain: str
    datacenter: str
    leaf_ttl: dt.timedelta
    intermediate_ttl: dt.timedelta
    root_ttl: dt.timedelta
    key_type: str
    key_bits: int


class Provider(Protocol):
    """What the CA manager needs of a PKI."""

    name: str

    def configure(self, options: CAOptions, config: Mapping[str, Any]) -> None:
        """Check and take the provider-specific configuration; no side effects yet."""

    def generate_root(self) -> RootMaterial:
        """Make a new root (and, for Vault, its signing intermediate). Idempotent per call:
        a failure leaves nothing that a later ``generate_root`` would trip over."""

    def load_root(self, cert: x509.Certificate, state: Mapping[str, Any]) -> None:
        """Make a root made earlier (perhaps by another replica) the one this provider signs
        with."""

    def check(self) -> None:
        """Ask the PKI whether this configuration works (its credentials are valid and, once a
        root is loaded, may sign leaves with it), before the manager commits a configuration.
        ProviderError with what the PKI answered."""

    def sign_leaf(
        self, csr_pem: str, info: CSRInfo, ttl: dt.timedelta
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Sign a CSR that already passed ``trellis.proxy.x509.check_csr`` (``info`` is its result).
        Returns the leaf and the chain to send with it (intermediates only; never the root)."""

    def cross_sign(self, new_root: x509.Certificate) -> x509.Certificate:
        """Have the current root vouch for ``new_root`` (same subject and key, issued by the
        current root). ProviderError if this provider cannot cross-sign."""

    def supports_cross_signing(self) -> bool: ...

    def cleanup(self, state: Mapping[str, Any]) -> None:
        """Release what a root that is no longer used holds (Vault mounts made for it)."""
