"""The CA manager: configuration, roots, signing, rotation and pruning, over any provider.

Theory of operation
-------------------
The CA's state is three kinds of system documents in the store, written with compare-and-set
so that replicas sharing a PostgreSQL store agree on one history:

* ``ca/config``: the provider's name and its configuration; secrets (the Vault token, a custom
  root's private key) sealed (``trellis.api.ca.secrets``). Never returned with a secret in it.
* ``ca/roots``: the trust domain, the active root's ID, a sequence number that rises on every
  change, and every trusted root with its public record (certificate, intermediates, the
  provider's non-secret state, and when it stopped being active).
* ``ca/keys/<id>``: the built-in provider's sealed private keys.

Signing a CSR: the pure policy (``trellis.proxy.x509.check_csr``) decides whether the CSR may be
signed at all and returns the identity it asks for; the caller's ACL decision on that identity
(``may_sign``) comes next, outside the pure check; the active root's provider signs; the leaf
goes out with the active root's ``IntermediateCerts`` (the provider's signing chain, then the
cross-signed certificate of the new root by the previous one), so peers that still trust only
the old root can verify it.

Rotation (``rotate``, a configuration change that touches the root key, or a provider switch):
pre-flight (can the current provider cross-sign? if not, refuse unless
``ForceWithoutCrossSigning``), the new provider makes a new root, the current provider
cross-signs it, and one compare-and-set write makes it active while keeping the old root
trusted. If anything fails before that write, what the new provider made is cleaned up and
nothing changes. Old roots are pruned once every leaf they signed has expired: 2 x LeafCertTTL
after they stopped being active.

A configuration change is tried before it is written (``Provider.check``): without a new root,
the new settings must load the active root and be allowed to sign with it; with one, the new
provider must accept its credentials before it makes the root. What only the configuration
can fix (a token Vault refuses) is the client's 400; a provider that is down, a 503. A stored
Vault token that stopped working is replaced by a plain PUT of a working one; cross-signing
needs the current root's key, so a switch away from a provider that refuses every credential
it has is refused, saying how to get out, unless forced.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from trellis.api.ca.builtin import BuiltinProvider
from trellis.api.ca.limits import Share, process_share
from trellis.api.ca.provider import CAOptions, Provider, ProviderError, RootMaterial
from trellis.api.ca.secrets import Sealer
from trellis.api.errors import (
    BadRequest,
    Conflict,
    PermissionDenied,
    StoreUnavailable,
    TooManyRequests,
    TrellisError,
)
from trellis.api.feed import Watch
from trellis.api.schemas import load
from trellis.api.schemas.ca import (
    ALIASES,
    MIN_LEAF_TTL,
    PROVIDERS,
    CAConfigurationSchema,
    validate_config,
)
from trellis.api.store.base import Store
from trellis.proxy import spiffe
from trellis.proxy import x509 as px
from trellis.proxy.durations import parse_duration

log = logging.getLogger("trellis.ca")

CONFIG_DOC, ROOTS_DOC, KEY_PREFIX = "ca/config", "ca/roots", "ca/keys/"
WATCH = Watch("system", prefixes=("ca/",))
ROOTS_WATCH = Watch("system", exact=(ROOTS_DOC,))

SECRET_FIELDS = ("Token", "PrivateKey")
#: Fields whose change needs a new root (and so a rotation).
ROOT_FIELDS = {
    "builtin": {"PrivateKeyType", "PrivateKeyBits", "PrivateKey", "RootCert"},
    "vault": {"PrivateKeyType", "PrivateKeyBits", "Address", "RootPKIPath", "IntermediatePKIPath"},
}
#: Fields of a root record that are the CA's business, not the API's.
INTERNAL_FIELDS = ("ProviderState", "ProviderConfig", "RotatedOutAt", "Provider")


class CAUnavailable(TrellisError):
    """The CA cannot serve right now (its provider is down, or it is not set up yet)."""

    status = 503
    code = "ca_unavailable"


@dataclass(frozen=True)
class SignedLeaf:
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    identity: spiffe.ServiceID
    root_id: str

    @property
    def cert_pem(self) -> str:
        return px.cert_pem(self.cert) + "".join(px.cert_pem(c) for c in self.chain)

    @property
    def serial(self) -> str:
        return px.serial_hex(self.cert.serial_number)


def _ttl(config: Mapping[str, Any], name: str) -> dt.timedelta:
    return dt.timedelta(seconds=parse_duration(str(config[name])))


def _rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Limiter:
    """CSRMaxPerSecond (token bucket) and CSRMaxConcurrent, for this process's share of them
    (``trellis.api.ca.limits``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Fix: the bucket starts full, as Go's rate.Limiter (Consul's) does. It started empty,
        # so the first CSRs after a server started were refused with a 429.
        self._tokens = float("inf")
        self._last = time.monotonic()
        self._inflight = 0

    def acquire(self, share: Share) -> None:
        with self._lock:
            if share.concurrent > 0:
                if self._inflight >= share.concurrent:
                    raise TooManyRequests(
                        "rate limit reached, try again later", headers={"Retry-After": "1"}
                    )
            elif share.rate > 0:
                now = time.monotonic()
                self._tokens = min(share.burst, self._tokens + (now - self._last) * share.rate)
                self._last = now
                if self._tokens < 1:
                    wait = max(1, int((1 - self._tokens) / share.rate + 0.999))
                    raise TooManyRequests(
                        "rate limit reached, try again later",
                        headers={"Retry-After": str(wait)},
                    )
                self._tokens -= 1
            self._inflight += 1

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1


class CAManager:
    def __init__(
        self,
        store: Store,
        *,
        datacenter: str,
        sealer: Sealer,
        bootstrap: tuple[str, Mapping[str, Any]] = ("builtin", {}),
        provider_factory: Callable[[str], Provider] | None = None,
        members: Callable[[], tuple[int, int]] = lambda: (0, 1),
        min_leaf_ttl: float = MIN_LEAF_TTL,
    ) -> None:
        """``members()``: this process's rank among the live server processes and their
        number (``trellis.api.members.Membership.share``), which split the CSR limits.
        ``min_leaf_ttl``: the shortest LeafCertTTL a configuration may ask for (the server's
        ``connect.min_leaf_cert_ttl``)."""
        self.store = store
        self.min_leaf_ttl = min_leaf_ttl
        self._members = members
        self.datacenter = datacenter
        self.sealer = sealer
        self.bootstrap = bootstrap
        self._factory = provider_factory or self._default_factory
        self._lock = threading.RLock()
        self._limiter = _Limiter()
        self._share_cache: tuple[tuple, Share] | None = None
        self._cache: tuple[int, dict, int, dict, int] | None = None  # pos, roots, ri, cfg, ci
        self._providers: dict[tuple[str, int], Provider] = {}
        self._chain_cache: dict[tuple, tuple[x509.Certificate, ...]] = {}
        self._trust_domain = (
            store.feed.position(),
            spiffe.trust_domain_for_cluster(store.cluster_id()),
        )

    @property
    def trust_domain(self) -> str:
        """The cluster's trust domain, from the cluster ID in the store. Read again only after
        a change that may have replaced the ID: a snapshot restore brings the archive's (and
        its CA, whose roots name it), and publishes a change of every topic (ANY), which
        ``topic_changed_since`` reports for any topic in O(1); nothing else writes it."""
        pos, td = self._trust_domain
        feed = self.store.feed
        if feed.topic_changed_since("meta", pos):
            pos = feed.position()
            td = spiffe.trust_domain_for_cluster(self.store.cluster_id())
            self._trust_domain = (pos, td)
        return td

    # -- providers -------------------------------------------------------------------------

    def _default_factory(self, name: str) -> Provider:
        if name == "builtin":
            return BuiltinProvider(_StoreKeys(self.store, self.sealer))
        if name == "vault":
            from trellis.api.ca.vault import VaultProvider

            return VaultProvider()
        raise BadRequest(f"unknown CA provider {name!r}")

    def _options(self, config: Mapping[str, Any]) -> CAOptions:
        return CAOptions(
            trust_domain=self.trust_domain,
            datacenter=self.datacenter,
            leaf_ttl=_ttl(config, "LeafCertTTL"),
            intermediate_ttl=_ttl(config, "IntermediateCertTTL"),
            root_ttl=_ttl(config, "RootCertTTL"),
            key_type=config["PrivateKeyType"],
            key_bits=config["PrivateKeyBits"],
        )

    def _new_provider(self, name: str, config: Mapping[str, Any]) -> Provider:
        p = self._factory(name)
        try:
            p.configure(self._options(config), config)
        except ProviderError as e:
            raise BadRequest(f"CA provider {name}: {e.message}") from None
        return p

    def _loaded(self, config: Mapping[str, Any], active: Mapping[str, Any]) -> Provider:
        """A provider for the active root, configured with ``config``: ProviderError if it
        cannot reach that root (BadRequest if it refuses the configuration outright)."""
        p = self._new_provider(active["Provider"], config)
        p.load_root(px.load_certs(active["RootCert"])[0], active["ProviderState"])
        return p

    def _seal(self, config: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for f in SECRET_FIELDS:
            if out.get(f):
                out[f] = {"Sealed": self.sealer.seal(f"{CONFIG_DOC}/{f}", str(out[f]))}
        return out

    def _config_doc(self, name: str, config: Mapping[str, Any], *, named: str) -> dict[str, Any]:
        """The ``ca/config`` document: the provider, its sealed configuration and, when the
        client called the provider by its alias (Consul's ``consul``), that name, which is
        what a read returns."""
        doc: dict[str, Any] = {"Provider": name, "Config": self._seal(config)}
        if named and named != name:
            doc["Named"] = named
        return doc

    def _unseal(self, config: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for f in SECRET_FIELDS:
            v = out.get(f)
            if isinstance(v, dict) and "Sealed" in v:
                out[f] = self.sealer.open(f"{CONFIG_DOC}/{f}", v["Sealed"])
        return out

    # -- state ----------------------------------------------------------------------------------

    def _state(self, *, fresh: bool = True) -> tuple[dict, int, dict, int]:
        """The roots and config documents.

        ``fresh=False`` (the signing hot path) reuses the last read until this process's feed
        reports a CA change; another process's change reaches the feed a few milliseconds
        after its commit, which is harmless for signing. Reads that answer clients and every
        change read the store, so a client always reads its own writes, whichever server
        process took them.
        """
        feed = self.store.feed
        cached = self._cache
        if not fresh and cached is not None and not feed.topic_changed_since("system", cached[0]):
            return cached[1], cached[2], cached[3], cached[4]
        pos = feed.position()
        roots = self.store.system_get(ROOTS_DOC)
        config = self.store.system_get(CONFIG_DOC)
        if roots is None or config is None:
            raise CAUnavailable("the CA is not initialized yet")
        self._cache = (pos, roots[0], roots[1], config[0], config[1])
        return roots[0], roots[1], config[0], config[1]

    def initialized(self) -> bool:
        return self.store.system_get(ROOTS_DOC) is not None

    def ensure_initialized(self) -> None:
        """Make the first root if there is none (once per cluster: CAS decides the race)."""
        with self._lock:
            if self.initialized():
                return
            name, raw = self.bootstrap
            name = ALIASES.get(name, name)
            if name not in PROVIDERS:
                raise BadRequest(f"unknown CA provider {name!r}")
            config = validate_config(
                name, raw, path="", what="connect.ca_config", min_leaf_ttl=self.min_leaf_ttl
            )
            provider = self._new_provider(name, config)
            material = self._generate(provider)
            record = self._record(name, material, config, cross=None)
            roots = {
                "TrustDomain": self.trust_domain,
                "ActiveRootID": record["ID"],
                "Sequence": 1,
                "Roots": [record],
            }
            doc = self._config_doc(name, config, named=self.bootstrap[0])
            idx = self.store.system_write(
                {ROOTS_DOC: roots, CONFIG_DOC: doc},
                expect={ROOTS_DOC: 0, CONFIG_DOC: 0},
            )
            if idx is None:
                # Another server initialized the CA first; drop ours.
                self._cleanup(provider, material.state)
                return
            log.info("CA initialized: provider %s, root %s", name, record["ID"])

    def _generate(self, provider: Provider, *, new_config: bool = False) -> RootMaterial:
        """The provider's new root. With ``new_config`` (a configuration a client just sent),
        a refusal that only the configuration can fix is the client's: a 400."""
        try:
            return provider.generate_root()
        except ProviderError as e:
            message = f"CA provider {provider.name} could not make a root: {e.message}"
            if new_config and not e.retryable:
                raise BadRequest(message) from None
            raise CAUnavailable(message + (" (will retry)" if e.retryable else "")) from None

    def _cleanup(self, provider: Provider, state: Mapping[str, Any]) -> None:
        try:
            provider.cleanup(state)
        except ProviderError as e:
            log.warning("CA provider %s cleanup failed: %s", provider.name, e.message)

    def _record(
        self,
        provider: str,
        material: RootMaterial,
        config: Mapping[str, Any],
        cross: x509.Certificate | None,
    ) -> dict[str, Any]:
        cert = material.cert
        ski = px.key_id(cert.public_key())  # type: ignore[arg-type]
        signer = material.signing_chain[0] if material.signing_chain else cert
        key_type, key_bits = px.key_description(cert.public_key())
        intermediates = [px.cert_pem(c) for c in material.signing_chain]
        if cross is not None:
            intermediates.append(px.cert_pem(cross))
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return {
            "ID": px.colon_hex(ski),
            "Name": str(cn[0].value) if cn else "Trellis CA",
            "SerialNumber": px.serial_hex(cert.serial_number),
            "SigningKeyID": px.colon_hex(px.key_id(signer.public_key())),  # type: ignore[arg-type]
            "NotBefore": _rfc3339(cert.not_valid_before_utc),
            "NotAfter": _rfc3339(cert.not_valid_after_utc),
            "RootCert": px.cert_pem(cert),
            "IntermediateCerts": intermediates,
            "PrivateKeyType": key_type,
            "PrivateKeyBits": key_bits,
            "Provider": provider,
            "ProviderState": dict(material.state),
            # The configuration this root was made with (secrets sealed), so that the root
            # can be cleaned up after a provider switch made the current config another one.
            "ProviderConfig": self._seal(config),
            "RotatedOutAt": None,
        }

    # -- reads --------------------------------------------------------------------------------

    def roots_view(self) -> tuple[dict, int]:
        """``/v1/connect/ca/roots``: every trusted root, the active one marked."""
        roots, idx, _, _ = self._state()
        out = []
        for r in roots["Roots"]:
            rec = {k: v for k, v in r.items() if k not in INTERNAL_FIELDS}
            rec["Active"] = r["ID"] == roots["ActiveRootID"]
            rec["ExternalTrustDomain"] = roots["TrustDomain"]
            rec["CreateIndex"] = idx
            rec["ModifyIndex"] = idx
            out.append(rec)
        return {
            "ActiveRootID": roots["ActiveRootID"],
            "TrustDomain": roots["TrustDomain"],
            "Sequence": roots["Sequence"],
            "Roots": out,
        }, idx

    def roots_index(self) -> tuple[str, int]:
        """The active root's ID and the roots' index, from this process's cached view."""
        roots, idx, _, _ = self._state(fresh=False)
        return roots["ActiveRootID"], idx

    def root_certs(self) -> list[x509.Certificate]:
        roots, _, _, _ = self._state()
        return [px.load_certs(r["RootCert"])[0] for r in roots["Roots"]]

    def config_view(self) -> tuple[dict, int]:
        """The configuration with every secret removed, whoever asks (CVE-2020-28053)."""
        _, _, config, idx = self._state()
        public = {k: v for k, v in config["Config"].items() if k not in SECRET_FIELDS}
        return {
            # The name as the client wrote it: Consul's clients write "consul" and compare
            # what they read back (Terraform's plan, py-consul's tests).
            "Provider": config.get("Named", config["Provider"]),
            "Config": public,
            "State": None,
            "ForceWithoutCrossSigning": False,
            "CreateIndex": idx,
            "ModifyIndex": idx,
        }, idx

    def leaf_key_spec(self) -> tuple[str, int]:
        """The key type and size of the configuration, for keys the server makes (agent
        leaves), from this process's cached view."""
        _, _, config, _ = self._state(fresh=False)
        return config["Config"]["PrivateKeyType"], config["Config"]["PrivateKeyBits"]

    def leaf_ttl(self) -> dt.timedelta:
        _, _, config, _ = self._state()
        return _ttl(config["Config"], "LeafCertTTL")

    # -- signing -------------------------------------------------------------------------------

    def _active_provider(
        self, roots: dict, config: dict, config_index: int
    ) -> tuple[Provider, dict]:
        active = _active(roots)
        key = (active["ID"], config_index)
        with self._lock:
            p = self._providers.get(key)
            if p is None:
                try:
                    p = self._loaded(self._unseal(config["Config"]), active)
                except ProviderError as e:
                    raise CAUnavailable(
                        f"CA provider {active['Provider']}: {e.message}{_fix_hint(e)}"
                    ) from None
                self._providers = {key: p}
        return p, active

    def sign_csr(self, csr_pem: str, may_sign: Callable[[str], bool]) -> SignedLeaf:
        """Sign a CSR for a service the caller may write.

        ``may_sign(service)``: the caller's ACL decision, whether its token may obtain a
        certificate for ``service`` (``service:write``); asked only about a CSR the policy
        accepted, with the service its URI SAN names, before anything is signed. Errors, in
        the order they are checked: TooManyRequests over the configured rate; BadRequest for a
        CSR the policy refuses (the sender's fault); PermissionDenied (403, Consul's wording)
        when ``may_sign`` says no, or whatever ``may_sign`` raises itself (an unknown token);
        CAUnavailable if the provider is down."""
        roots, _, config, cidx = self._state(fresh=False)
        cfg = config["Config"]
        self._limiter.acquire(self._share(cfg))
        try:
            try:
                csr = px.load_csr(csr_pem)
                info = px.check_csr(csr, trust_domain=self.trust_domain, datacenter=self.datacenter)
            except px.PolicyError as e:
                raise BadRequest(f"CSR refused: {e}") from None
            service = info.identity.service
            if not may_sign(service):
                # A permission failure, not a malformed request: 403, worded as every other
                # ACL refusal is (trellis.api.acl.service.require).
                raise PermissionDenied(f"token lacks permission 'service:write on {service!r}'")
            provider, active = self._active_provider(roots, config, cidx)
            try:
                leaf, chain = provider.sign_leaf(csr_pem, info, _ttl(cfg, "LeafCertTTL"))
            except ProviderError as e:
                raise CAUnavailable(
                    f"CA provider {provider.name} could not sign: {e.message}{_fix_hint(e)}"
                ) from None
            if provider.name != "builtin":
                # Defence in depth: whatever an external PKI returned must be the leaf we
                # asked for. (The built-in provider builds it from the checked CSR itself.)
                got = px.leaf_identity(leaf)
                if got != info.identity:
                    raise CAUnavailable(
                        "the CA provider returned a certificate for another identity"
                    )
            return SignedLeaf(
                leaf, tuple(chain) + self._extra_chain(active, chain), info.identity, active["ID"]
            )
        finally:
            self._limiter.release()

    def _share(self, cfg: Mapping[str, Any]) -> Share:
        """This process's share of the configured limits; recomputed only when the limits or
        the membership change (this is on every signing)."""
        key = (cfg["CSRMaxPerSecond"], cfg["CSRMaxConcurrent"], self._members())
        cached = self._share_cache
        if cached is None or cached[0] != key:
            rate, concurrent, (rank, count) = key
            cached = self._share_cache = (
                key,
                process_share(float(rate), int(concurrent), rank, count),
            )
        return cached[1]

    def _extra_chain(
        self, active: dict, chain: tuple[x509.Certificate, ...]
    ) -> tuple[x509.Certificate, ...]:
        """The active root's intermediates that the provider's chain lacks (the cross-signed
        certificate of the new root), parsed once per root rather than per signing."""
        key = (active["ID"], tuple(px.fingerprint(c) for c in chain))
        hit = self._chain_cache.get(key)
        if hit is None:
            have = set(key[1])
            hit = tuple(
                c
                for pem in active["IntermediateCerts"]
                for c in px.load_certs(pem)
                if px.fingerprint(c) not in have
            )
            if len(self._chain_cache) > 64:
                self._chain_cache.clear()
            self._chain_cache[key] = hit
        return hit

    # -- configuration and rotation ---------------------------------------------------------------

    def set_config(self, body: Mapping[str, Any]) -> None:
        """``PUT /v1/connect/ca/configuration``: rotate if the change needs a new root."""
        request = load(CAConfigurationSchema, body)
        name, raw, force = request["provider"], request["config"], request["force"]
        named = request["named"]
        with self._lock:
            self.ensure_initialized()
            roots, ridx, config, cidx = self._state()
            old_name = config["Provider"]
            old_cfg = self._unseal(config["Config"])
            if name == old_name and name == "vault" and "Token" not in raw:
                raw = {**raw, "Token": old_cfg.get("Token")}  # keep the token if not resent
            new_cfg = validate_config(name, raw, min_leaf_ttl=self.min_leaf_ttl)
            rotate = name != old_name or any(
                new_cfg.get(f) != old_cfg.get(f) for f in ROOT_FIELDS[name]
            )
            if not rotate:
                # No new root (TTLs, limits, Vault credentials). Try the new settings on the
                # active root before committing them: a token Vault refuses is the client's
                # 400 now, not a 503 on every CSR after a 200.
                try:
                    self._loaded(new_cfg, _active(roots)).check()
                except ProviderError as e:
                    raise _refused(name, e) from None
                if (
                    self.store.system_write(
                        {CONFIG_DOC: self._config_doc(name, new_cfg, named=named)},
                        expect={CONFIG_DOC: cidx},
                    )
                    is None
                ):
                    raise Conflict("the CA configuration changed meanwhile; read it and retry")
                return
            self._rotate(
                name,
                new_cfg,
                force=force,
                roots=roots,
                ridx=ridx,
                cidx=cidx,
                config=config,
                new_config=True,
                named=named,
            )

    def rotate(self, *, force: bool = False) -> None:
        """Make a new root with the current configuration (``trellis ca rotate``)."""
        with self._lock:
            self.ensure_initialized()
            roots, ridx, config, cidx = self._state()
            cfg = self._unseal(config["Config"])
            self._rotate(
                config["Provider"],
                cfg,
                force=force,
                roots=roots,
                ridx=ridx,
                cidx=cidx,
                config=config,
                named=config.get("Named", config["Provider"]),
            )

    def _rotate(
        self,
        name: str,
        new_cfg: dict[str, Any],
        *,
        force: bool,
        roots: dict,
        ridx: int,
        cidx: int,
        config: dict,
        new_config: bool = False,
        named: str = "",
    ) -> None:
        old_provider = self._cross_signer(name, new_cfg, force=force, roots=roots, config=config)
        if not force and old_provider is not None and not old_provider.supports_cross_signing():
            raise BadRequest(
                f"the current CA provider ({old_provider.name}) cannot cross-sign a new root;"
                " set ForceWithoutCrossSigning to rotate anyway (existing connections keep"
                " working, but peers must fetch the new root before they trust new leaves)"
            )
        new_provider = self._new_provider(name, new_cfg)
        if new_config:
            try:
                new_provider.check()
            except ProviderError as e:
                raise _refused(name, e) from None
        material = self._generate(new_provider, new_config=new_config)
        try:
            cross = None
            try:
                if old_provider is None:
                    raise ProviderError("the current CA provider is unavailable")
                cross = old_provider.cross_sign(material.cert)
            except ProviderError as e:
                if not force:
                    raise BadRequest(
                        f"the current CA provider could not cross-sign the new root: {e.message};"
                        " set ForceWithoutCrossSigning to rotate anyway"
                    ) from None
            record = self._record(name, material, new_cfg, cross)
            now = time.time()
            kept = []
            for r in roots["Roots"]:
                r = dict(r)
                if r["ID"] == roots["ActiveRootID"]:
                    r["RotatedOutAt"] = now
                kept.append(r)
            if any(r["ID"] == record["ID"] for r in kept):
                raise BadRequest("the new root is the same as a trusted one (same key)")
            new_roots = {
                "TrustDomain": roots["TrustDomain"],
                "ActiveRootID": record["ID"],
                "Sequence": roots["Sequence"] + 1,
                "Roots": [*kept, record],
            }
            idx = self.store.system_write(
                {
                    ROOTS_DOC: new_roots,
                    CONFIG_DOC: self._config_doc(name, new_cfg, named=named),
                },
                expect={ROOTS_DOC: ridx, CONFIG_DOC: cidx},
            )
            if idx is None:
                raise Conflict("the CA changed meanwhile (another rotation?); retry")
        except BaseException:
            self._cleanup(new_provider, material.state)
            raise
        log.info("CA root rotated: %s is now active (provider %s)", record["ID"], name)

    def _cross_signer(
        self,
        name: str,
        new_cfg: Mapping[str, Any],
        *,
        force: bool,
        roots: dict,
        config: dict,
    ) -> Provider | None:
        """The provider of the active root, to cross-sign the new one; None (forced only) if it
        cannot be used.

        Only that provider can cross-sign: it alone holds the active root's key (for Vault, in
        Vault). When it fails, a Vault token that stopped working is the usual cause, so a
        configuration for the same Vault with another Token tries that token on the active
        root too. Otherwise the rotation is refused, with what to do, unless forced.
        """
        active = _active(roots)
        old_cfg = self._unseal(config["Config"])
        try:
            return self._loaded(old_cfg, active)
        except ProviderError as e:
            failure = e
        same_vault = active["Provider"] == name == "vault" and all(
            new_cfg.get(f) == old_cfg.get(f) for f in ("Address", "Namespace")
        )
        if same_vault and new_cfg.get("Token") != old_cfg.get("Token"):
            try:
                return self._loaded({**old_cfg, "Token": new_cfg["Token"]}, active)
            except ProviderError:
                pass  # report the failure with the stored configuration
        if force:
            return None
        message = (
            f"the current CA provider ({active['Provider']}) cannot be used: {failure.message}."
            " The new root must be cross-signed with the current root's key, which only that"
            " provider holds: make it work again first (for Vault, PUT its configuration with"
            " a working Token; that takes effect without a new root), or set"
            " ForceWithoutCrossSigning to rotate without cross-signing (leaves of the current"
            " root stay valid until they expire; peers that trust only the current root"
            " accept new leaves once they have fetched the new root)"
        )
        if failure.retryable:
            raise CAUnavailable(message + "; or try again")
        raise BadRequest(message)

    def prune(self, now: float | None = None) -> int:
        """Drop roots whose every leaf has expired (2 x LeafCertTTL after rotation)."""
        now = time.time() if now is None else now
        with self._lock:
            try:
                roots, ridx, config, _cidx = self._state()
            except CAUnavailable:
                return 0
            grace = 2 * _ttl(config["Config"], "LeafCertTTL").total_seconds()
            dead = [
                r
                for r in roots["Roots"]
                if r["ID"] != roots["ActiveRootID"]
                and r.get("RotatedOutAt") is not None
                and now >= r["RotatedOutAt"] + grace
            ]
            if not dead:
                return 0
            ids = {r["ID"] for r in dead}
            new_roots = {
                **roots,
                "Sequence": roots["Sequence"] + 1,
                "Roots": [r for r in roots["Roots"] if r["ID"] not in ids],
            }
            if self.store.system_write({ROOTS_DOC: new_roots}, expect={ROOTS_DOC: ridx}) is None:
                return 0
            for r in dead:
                try:
                    p = self._new_provider(r["Provider"], self._unseal(r["ProviderConfig"]))
                    self._cleanup(p, r["ProviderState"])
                except (BadRequest, ProviderError) as e:
                    log.warning("cleanup of pruned root %s failed: %s", r["ID"], e)
            log.info("pruned %d expired CA root(s)", len(dead))
            return len(dead)


def _active(roots: Mapping[str, Any]) -> dict[str, Any]:
    active: dict[str, Any] = next(r for r in roots["Roots"] if r["ID"] == roots["ActiveRootID"])
    return active


def _fix_hint(e: ProviderError) -> str:
    """What an operator can do about a provider failure that will not pass by itself."""
    if e.retryable:
        return ""
    return " (fix the CA configuration: PUT /v1/connect/ca/configuration)"


def _refused(name: str, e: ProviderError) -> TrellisError:
    """A provider's answer to a configuration a client sent: the client's to fix (400), unless
    it may pass by itself (503: Vault down, try again)."""
    message = f"CA provider {name} refused the configuration: {e.message}"
    if e.retryable:
        return CAUnavailable(message + " (try again)")
    return BadRequest(message)


class _StoreKeys:
    """The built-in provider's key store: sealed documents ``ca/keys/<id>``."""

    def __init__(self, store: Store, sealer: Sealer) -> None:
        self.store = store
        self.sealer = sealer

    def put_key(self, key_id: str, pem: str) -> None:
        name = KEY_PREFIX + key_id
        if self.store.system_write({name: {"Sealed": self.sealer.seal(name, pem)}}) is None:
            raise StoreUnavailable("could not store the CA key")

    def get_key(self, key_id: str) -> str:
        name = KEY_PREFIX + key_id
        doc = self.store.system_get(name)
        if doc is None:
            raise ProviderError(f"CA key {key_id} is missing from the store")
        return self.sealer.open(name, doc[0]["Sealed"])

    def delete_key(self, key_id: str) -> None:
        self.store.system_write({KEY_PREFIX + key_id: None})
