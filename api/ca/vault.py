"""The Vault CA provider: roots and intermediates live in Vault's (or OpenBao's) PKI engine.

Theory of operation
-------------------
Two PKI mounts, as in Consul: the *root mount* (``RootPKIPath``) holds root issuers, the
*intermediate mount* (``IntermediatePKIPath``) holds the intermediates that sign leaves. Keys
never leave Vault; this module only ever sees certificates, CSRs and IDs.

**Generations.** Every ``generate_root`` makes a *generation* ``g`` (8 random hex digits) and
adds, next to whatever the mounts already hold (PKI multi-issuer API):

* in the root mount: a key and an issuer both named ``trellis-root-<g>`` (a new self-signed
  root with the URI SAN ``spiffe://<trust domain>``), unless the operator pointed us at a root
  mount that already holds a root of theirs (see *Reuse*);
* in the intermediate mount: a key ``trellis-int-<g>`` and the issuer made from it, signed by
  that root (``issuer/<root>/sign-intermediate``), with ``leaf_not_after_behavior=truncate``;
* a role ``trellis-leaf-<g>`` pinned to that intermediate (``issuer_ref``) whose only allowed
  names are ``spiffe://<td>/ns/default/dc/<dc>/svc/*`` URI SANs.

A rotation is simply another generation in the *same* mounts. We chose this over a new mount
per root because the operator's paths stay the paths (a Vault policy on ``<root>/*`` and
``<int>/*`` covers every generation, and ``sys/mounts`` rights are needed only for the first
set-up); old and new roots coexist naturally while leaves of both are alive; and an old root is
released by deleting *named* objects (role, issuers, keys), never a mount someone else may use.
Names are unique per generation, so setting up again on the same Vault never collides
("issuer name already in use").

**Ownership.** Mounts we enable carry the description ``MOUNT_MARK``. ``cleanup`` deletes only
what the state names *and* carries our naming (``trellis-...-<g>``); it disables a mount only if
it carries our mark, is named in the state, and no longer holds any issuer. An operator's
mount, or an operator's root that we reused, is never deleted.

**Reuse.** On the first ``generate_root`` of a provider that has no active root, if the root
mount's default issuer is a self-signed root *not* made by Trellis (the operator brought their
own), it is reused (Consul's behaviour); the intermediate, role and leaves are still ours.
A later ``generate_root`` on the same provider (a rotation) always makes a new root.

**Never half-configured.** ``generate_root`` records an undo step for everything it creates
(mount, key, issuer, role) and, if any later step fails, undoes them in reverse (best effort,
by *name*, so even an object whose creation response was lost is found) before raising.

**Which root signs.** ``generate_root`` and ``load_root`` make a generation *active*: leaves
are signed by its role. ``cross_sign(new)`` uses the active root, unless ``new`` *is* the active
root (the same provider instance has just rotated), in which case it uses the root that was
active before: so the manager may ask either the old provider instance or the rotated one.

**Namespaces.** The state records the Vault namespace a generation was made in; a root made
before ``Namespace`` changed is still loaded, cross-signed with and cleaned up where it lives.

**Errors.** hvac and requests exceptions are translated here, and only here, into
``ProviderError``: connection errors, timeouts, 429, 5xx and 412 are ``retryable``; 4xx (a bad
token, permission denied, a bad request) and TLS failures need an operator. Messages name the
Vault address and the operation, never the token; the token is kept only inside the hvac
client (not in settings, state, ``repr`` or logs).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trellis.api.ca.provider import CAOptions, ProviderError, RootMaterial
from trellis.proxy import spiffe
from trellis.proxy import x509 as px
from trellis.proxy.x509 import CSRInfo

log = logging.getLogger("trellis.ca.vault")

DEFAULT_ROOT_PATH = "trellis-root"
DEFAULT_INTERMEDIATE_PATH = "trellis-int"
#: Description of the mounts this provider enabled: how ``cleanup`` recognises its own.
MOUNT_MARK = "trellis: managed CA mount"
ROOT_PREFIX = "trellis-root-"
INTERMEDIATE_PREFIX = "trellis-int-"
ROLE_PREFIX = "trellis-leaf-"
#: Seconds for connecting to and hearing back from Vault, per request.
REQUEST_TIMEOUT = 10.0
#: Vault's default ``max_lease_ttl`` when a mount says 0.
_SYSTEM_MAX_TTL = 768 * 3600

#: Vault warnings that are expected here and not worth an operator's attention: the mesh does
#: not use AIA/CRL discovery, and the intermediate's path length of 0 is deliberate.
_EXPECTED_WARNINGS = (
    "authority information access",
    "Max path length of the signed certificate is zero",
)
_MOUNT_PATH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*$")
_GENERATION = re.compile(r"^[0-9a-f]{8}$")
_STATE_KEYS = (
    "root_mount",
    "intermediate_mount",
    "generation",
    "root_issuer_id",
    "intermediate_issuer_id",
    "role",
)


@dataclass(frozen=True)
class VaultSettings:
    """The non-secret part of the Vault configuration (the token is not here, on purpose)."""

    address: str
    root_path: str
    intermediate_path: str
    namespace: str | None = None
    ca_file: str | None = None
    ca_path: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_server_name: str | None = None
    tls_skip_verify: bool = False


@dataclass(frozen=True)
class _Generation:
    """A root this provider can use: the certificates and where they live in Vault."""

    root: x509.Certificate
    intermediate: x509.Certificate
    state: Mapping[str, Any] = field(default_factory=dict)

    @property
    def root_mount(self) -> str:
        return str(self.state["root_mount"])

    @property
    def intermediate_mount(self) -> str:
        return str(self.state["intermediate_mount"])

    @property
    def role(self) -> str:
        return str(self.state["role"])


class _ServerNameAdapter(requests.adapters.HTTPAdapter):
    """Sends ``TLSServerName`` as SNI and checks the server certificate against it, whatever
    host the address names (Consul's ``TLSServerName``)."""

    def __init__(self, server_name: str) -> None:
        self._server_name = server_name
        super().__init__(pool_connections=4, pool_maxsize=64)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self._server_name
        kwargs["assert_hostname"] = self._server_name
        super().init_poolmanager(*args, **kwargs)


def _seconds(td: dt.timedelta) -> str:
    return f"{int(td.total_seconds())}s"


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _same_key(a: Any, b: Any) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(
        a.public_bytes(serialization.Encoding.DER, fmt)
        == b.public_bytes(serialization.Encoding.DER, fmt)
    )


def _bad(message: str) -> ProviderError:
    return ProviderError(message, retryable=False)


# -- configuration ---------------------------------------------------------------------------


def _opt_str(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad(f"Vault CA config: {key} must be a string, not {type(value).__name__}")
    return value


def _mount_path(config: Mapping[str, Any], key: str, default: str) -> str:
    value = _opt_str(config, key)
    path = default if value is None else value.strip("/")
    if not _MOUNT_PATH.match(path) or ".." in path.split("/"):
        raise _bad(
            f"Vault CA config: {key} {value!r} is not a valid mount path "
            "(letters, digits, '_', '-', '.' and '/' between segments)"
        )
    return path


def _address(config: Mapping[str, Any]) -> str:
    value = _opt_str(config, "Address")
    if value is None:
        raise _bad("Vault CA config: Address is required (e.g. https://vault.example:8200)")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(f"Vault CA config: Address {value!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise _bad("Vault CA config: Address must not carry credentials; use Token")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise _bad(f"Vault CA config: Address {value!r} must have no path, query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise _bad(f"Vault CA config: Address {value!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def _token(config: Mapping[str, Any]) -> str:
    value = config.get("Token")
    if value is None or value == "":
        raise _bad("Vault CA config: Token is required")
    if not isinstance(value, str):
        raise _bad(f"Vault CA config: Token must be a string, not {type(value).__name__}")
    # Never echo the value: a token with a stray newline is still a secret.
    if any(c.isspace() or not c.isprintable() for c in value):
        raise _bad("Vault CA config: Token contains whitespace or control characters")
    return value


def _auth_method(config: Mapping[str, Any]) -> None:
    method = config.get("AuthMethod")
    if method is None or method == {}:
        return
    if not isinstance(method, Mapping):
        raise _bad('Vault CA config: AuthMethod must be an object like {"Type": "token"}')
    kind = method.get("Type")
    if kind != "token":
        raise _bad(
            f"Vault CA config: AuthMethod type {kind!r} is not supported yet; "
            'only token auth is (set Token, and AuthMethod {"Type": "token"} or nothing)'
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_config(config: Mapping[str, Any]) -> tuple[VaultSettings, str]:
    """Check Consul's Vault provider settings; return them and, apart, the token.

    Keys other than the Vault ones (e.g. ``LeafCertTTL``) belong to the common CA options and
    are ignored here. ProviderError(retryable=False) names the field at fault.
    """
    if not isinstance(config, Mapping):
        raise _bad("Vault CA config must be an object")
    address = _address(config)
    token = _token(config)
    _auth_method(config)
    root_path = _mount_path(config, "RootPKIPath", DEFAULT_ROOT_PATH)
    int_path = _mount_path(config, "IntermediatePKIPath", DEFAULT_INTERMEDIATE_PATH)
    if root_path == int_path:
        raise _bad("Vault CA config: RootPKIPath and IntermediatePKIPath must differ")
    if (root_path + "/").startswith(int_path + "/") or (int_path + "/").startswith(root_path + "/"):
        raise _bad("Vault CA config: RootPKIPath and IntermediatePKIPath must not nest")
    skip = config.get("TLSSkipVerify", False)
    if skip is None:
        skip = False
    if not isinstance(skip, bool):
        raise _bad("Vault CA config: TLSSkipVerify must be true or false")
    ca_file = _opt_str(config, "CAFile")
    ca_path = _opt_str(config, "CAPath")
    cert_file = _opt_str(config, "CertFile")
    key_file = _opt_str(config, "KeyFile")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise _bad(f"Vault CA config: CAFile {ca_file!r} is not a readable file")
    if ca_path is not None and not os.path.isdir(ca_path):
        raise _bad(f"Vault CA config: CAPath {ca_path!r} is not a directory")
    if (cert_file is None) != (key_file is None):
        raise _bad("Vault CA config: CertFile and KeyFile go together; set both or neither")
    for key, value in (("CertFile", cert_file), ("KeyFile", key_file)):
        if value is not None and not os.path.isfile(value):
            raise _bad(f"Vault CA config: {key} {value!r} is not a readable file")
    settings = VaultSettings(
        address=address,
        root_path=root_path,
        intermediate_path=int_path,
        namespace=_opt_str(config, "Namespace"),
        ca_file=ca_file,
        ca_path=ca_path,
        cert_file=cert_file,
        key_file=key_file,
        tls_server_name=_opt_str(config, "TLSServerName"),
        tls_skip_verify=skip,
    )
    return settings, token


def _build_client(settings: VaultSettings, token: str, namespace: str | None) -> hvac.Client:
    verify: bool | str = True
    if settings.tls_skip_verify:
        verify = False
    elif settings.ca_file:
        verify = settings.ca_file
    elif settings.ca_path:
        verify = settings.ca_path
    cert = (settings.cert_file, settings.key_file) if settings.cert_file else None
    session = requests.Session()
    # One server process signs for many concurrent requests: keep enough connections to
    # Vault that bursts do not open (and log) a new one each time past the default ten.
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64))
    session.mount("https://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64))
    # The configuration decides, not the environment (REQUESTS_CA_BUNDLE, *_PROXY, netrc):
    # a proxy from the environment would otherwise see the token.
    session.trust_env = False
    session.verify = verify
    session.cert = cert  # type: ignore[assignment]
    if settings.tls_server_name and settings.address.startswith("https://"):
        session.mount("https://", _ServerNameAdapter(settings.tls_server_name))
    return hvac.Client(
        url=settings.address,
        token=token,
        cert=cert,
        verify=verify,
        timeout=REQUEST_TIMEOUT,
        # Never follow a redirect: the token travels in a custom header, which requests does
        # not strip when a redirect leads to another host.
        allow_redirects=False,
        session=session,
        namespace=namespace,
        adapter=_SessionAdapter,
    )


class _SessionAdapter(hvac.adapters.JSONAdapter):
    """hvac's JSON adapter, taking the client certificate and the CA from its session only.

    ``hvac.Client`` replaces a ``cert`` of None with VAULT_CLIENT_CERT/VAULT_CLIENT_KEY from
    the environment (read when hvac is imported) before it builds its adapter, and the adapter
    would send it with every request. The configuration decides here, as it does for the proxy
    and the CA (``session.trust_env`` is off), so the adapter, which hvac builds from the class
    given to the client (its documented extension point), takes both from the session that
    ``_build_client`` configured. Only public constructor arguments are used.
    """

    def __init__(self, *, session: requests.Session, **kwargs: Any) -> None:
        kwargs.update(cert=session.cert, verify=session.verify)
        super().__init__(session=session, **kwargs)


# -- the provider ----------------------------------------------------------------------------


class VaultProvider:
    """The CA ``Provider`` backed by a Vault/OpenBao PKI engine (see the module docstring)."""

    name = "vault"

    def __init__(self) -> None:
        self._options: CAOptions | None = None
        self._settings: VaultSettings | None = None
        self._client: hvac.Client | None = None
        #: Clients for roots made in another Vault namespace than the configured one.
        self._other_namespaces: dict[str, hvac.Client] = {}
        self._active: _Generation | None = None
        self._previous: _Generation | None = None

    def __repr__(self) -> str:
        s = self._settings
        where = f"{s.address} {s.root_path} {s.intermediate_path}" if s else "unconfigured"
        return f"<VaultProvider {where}>"

    # -- configuration -----------------------------------------------------------------------

    def configure(self, options: CAOptions, config: Mapping[str, Any]) -> None:
        """Check the settings and build the client; no request is made yet."""
        if options.key_type not in ("ec", "rsa"):
            raise _bad(f"private key type must be ec or rsa, not {options.key_type!r}")
        for label, ttl in (
            ("leaf", options.leaf_ttl),
            ("intermediate", options.intermediate_ttl),
            ("root", options.root_ttl),
        ):
            if ttl.total_seconds() < 1:
                raise _bad(f"the {label} certificate TTL must be positive")
        spiffe.signing_id(options.trust_domain)  # a bad trust domain is a bug upstream
        settings, token = parse_config(config)
        https = settings.address.startswith("https://")
        if settings.tls_skip_verify and https:
            log.warning(
                "Vault CA provider: TLSSkipVerify is set, so the certificate of %s is not "
                "checked: anyone who can intercept the connection can impersonate Vault, "
                "read the Vault token and sign certificates for every service in the mesh. "
                "Set CAFile or CAPath instead.",
                settings.address,
            )
        if not https and not _is_loopback(urlsplit(settings.address).hostname or ""):
            log.warning(
                "Vault CA provider: %s is plain HTTP; the Vault token and every CSR and "
                "certificate cross the network unencrypted",
                settings.address,
            )
        self._options = options
        self._settings = settings
        self._client = _build_client(settings, token, settings.namespace)
        self._other_namespaces = {}
        self._active = None
        self._previous = None

    # -- plumbing ----------------------------------------------------------------------------

    def _ready(self) -> tuple[CAOptions, VaultSettings, hvac.Client]:
        if self._options is None or self._settings is None or self._client is None:
            raise _bad("the Vault CA provider is not configured")
        return self._options, self._settings, self._client

    def _client_for(self, state: Mapping[str, Any]) -> hvac.Client:
        """The client for the Vault namespace a root was made in (usually the configured one;
        an older root may predate a change of ``Namespace``)."""
        _, settings, client = self._ready()
        namespace = state.get("namespace") or None
        if namespace == settings.namespace or not isinstance(namespace, str):
            return client
        other = self._other_namespaces.get(namespace)
        if other is None:
            other = _build_client(settings, client.token, namespace)
            self._other_namespaces[namespace] = other
        return other

    def _scrub(self, text: str) -> str:
        token = self._client.token if self._client is not None else None
        if token:
            text = text.replace(token, "<token>")
        return text

    @contextmanager
    def _vault(self, operation: str) -> Iterator[None]:
        """Translate hvac/requests exceptions raised while doing ``operation``."""
        address = self._settings.address if self._settings else "?"
        try:
            yield
        except hvac.exceptions.VaultError as e:
            errors = e.errors if isinstance(e.errors, list) else None
            detail = "; ".join(str(x).strip() for x in errors) if errors else str(e.args[0])
            retryable = isinstance(
                e,
                hvac.exceptions.InternalServerError
                | hvac.exceptions.VaultDown
                | hvac.exceptions.BadGateway
                | hvac.exceptions.RateLimitExceeded
                | hvac.exceptions.PreconditionFailed,
            )
            kind = type(e).__name__
            raise ProviderError(
                self._scrub(f"Vault at {address}: {operation} failed ({kind}): {detail}"),
                retryable=retryable,
            ) from None
        except requests.exceptions.SSLError as e:
            raise ProviderError(
                self._scrub(f"Vault at {address}: {operation} failed: TLS error: {e}"),
                retryable=False,
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise ProviderError(
                self._scrub(f"Vault at {address}: {operation} failed: cannot reach Vault: {e}"),
                retryable=True,
            ) from None
        except requests.exceptions.RequestException as e:
            raise ProviderError(
                self._scrub(f"Vault at {address}: {operation} failed: {e}"), retryable=False
            ) from None

    def _data(self, response: Any, operation: str) -> dict[str, Any]:
        if not isinstance(response, dict) or not isinstance(response.get("data"), dict):
            address = self._settings.address if self._settings else "?"
            raise ProviderError(
                f"Vault at {address}: {operation}: unexpected response (not a Vault JSON "
                "body with data; a redirect to a standby, or not Vault?)",
                retryable=True,
            )
        data: dict[str, Any] = response["data"]
        for w in response.get("warnings") or ():
            if not any(fragment in str(w) for fragment in _EXPECTED_WARNINGS):
                log.warning("Vault CA provider: %s: Vault warns: %s", operation, w)
        return data

    def _cert(self, pem: Any, what: str) -> x509.Certificate:
        if not isinstance(pem, str):
            raise ProviderError(f"Vault returned no {what} certificate", retryable=False)
        try:
            certs = px.load_certs(pem)
        except px.PolicyError as e:
            raise ProviderError(f"Vault returned a bad {what} certificate: {e}") from None
        if not certs:
            raise ProviderError(f"Vault returned no {what} certificate", retryable=False)
        return certs[0]

    def _mounts(self, client: hvac.Client) -> dict[str, Any]:
        with self._vault("list secrets engines (sys/mounts)"):
            response = client.read("sys/mounts")
        data = self._data(response, "list secrets engines")
        return {k.rstrip("/"): v for k, v in data.items() if isinstance(v, dict)}

    def _issuers(self, client: hvac.Client, mount: str) -> dict[str, dict[str, Any]]:
        """Issuer ID -> info (issuer_name, key_id, is_default); {} for a missing mount."""
        with self._vault(f"list issuers of {mount}"):
            response = client.list(f"{mount}/issuers")
        if response is None:
            return {}
        info = self._data(response, f"list issuers of {mount}").get("key_info") or {}
        return {str(k): v for k, v in info.items() if isinstance(v, dict)}

    # -- generate_root -----------------------------------------------------------------------

    def generate_root(self) -> RootMaterial:
        """Make a new generation (root unless reused, intermediate, role); see the module
        docstring. All or nothing: a failure undoes what this call created."""
        options, settings, client = self._ready()
        gen = secrets.token_hex(4)
        undo: list[tuple[str, Callable[[], Any]]] = []
        try:
            material = self._generate(options, settings, client, gen, undo)
        except BaseException as e:
            self._undo(undo)
            if isinstance(e, ProviderError):
                raise
            if isinstance(e, Exception):
                raise ProviderError(
                    self._scrub(f"Vault at {settings.address}: generating a root failed: {e}"),
                    retryable=False,
                ) from e
            raise
        self._previous, self._active = (
            self._active,
            _Generation(material.cert, material.signing_chain[0], material.state),
        )
        log.info(
            "Vault CA provider: generation %s ready (root %s, intermediate %s, role %s)",
            gen,
            px.fingerprint(material.cert)[:16],
            px.fingerprint(material.signing_chain[0])[:16],
            material.state["role"],
        )
        return material

    def _undo(self, undo: list[tuple[str, Callable[[], Any]]]) -> None:
        for what, step in reversed(undo):
            try:
                with self._vault(what):
                    step()
            except ProviderError as e:
                log.warning(
                    "Vault CA provider: undoing a failed set-up: %s failed: %s", what, e.message
                )
            except Exception as e:  # best effort: keep undoing the rest
                log.warning("Vault CA provider: undoing a failed set-up: %s failed: %s", what, e)

    def _ensure_mount(
        self,
        client: hvac.Client,
        mounts: Mapping[str, Any],
        path: str,
        max_ttl: dt.timedelta,
        undo: list[tuple[str, Callable[[], Any]]],
    ) -> bool:
        """Enable a PKI mount at ``path`` unless one is there; True if this call enabled it."""
        need = int(max_ttl.total_seconds())
        existing = mounts.get(path)
        if existing is not None:
            if existing.get("type") != "pki":
                raise _bad(
                    f"Vault at {self._settings.address if self._settings else '?'}: mount "
                    f"{path!r} exists and is a {existing.get('type')!r} engine, not pki"
                )
            have = int((existing.get("config") or {}).get("max_lease_ttl") or 0)
            if (have or _SYSTEM_MAX_TTL) < need:
                # Without this, certificates are silently cut to the mount's maximum.
                with self._vault(f"raise max_lease_ttl of {path}"):
                    client.sys.tune_mount_configuration(path=path, max_lease_ttl=f"{need}s")
                log.info("Vault CA provider: raised max_lease_ttl of %s to %ss", path, need)
            return False
        try:
            with self._vault(f"enable PKI mount {path}"):
                client.sys.enable_secrets_engine(
                    backend_type="pki",
                    path=path,
                    description=MOUNT_MARK,
                    config={"max_lease_ttl": f"{need}s"},
                )
        except ProviderError as e:
            if "already in use" not in e.message:
                raise
            # Another replica enabled it a moment ago: use it, and leave it be on failure.
            return False
        undo.append((f"disable mount {path}", lambda: client.sys.disable_secrets_engine(path)))
        return True

    def _reusable_root(
        self, client: hvac.Client, mount: str
    ) -> tuple[str, x509.Certificate] | None:
        """The operator's own root in the root mount, if there is one to reuse."""
        if self._active is not None:
            return None  # a rotation: always a new root
        default = None
        for issuer_id, info in self._issuers(client, mount).items():
            if info.get("is_default"):
                default = (issuer_id, info)
        if default is None:
            return None
        issuer_id, info = default
        if str(info.get("issuer_name") or "").startswith(ROOT_PREFIX):
            return None  # ours, from an earlier set-up: make a fresh root instead
        with self._vault(f"read issuer {issuer_id} of {mount}"):
            data = self._data(client.read(f"{mount}/issuer/{issuer_id}"), "read root issuer")
        cert = self._cert(data.get("certificate"), "root")
        if cert.subject != cert.issuer:
            raise _bad(
                f"the default issuer of {mount} is not a self-signed root "
                f"({cert.subject.rfc4514_string()}); point RootPKIPath at a root mount"
            )
        if not data.get("key_id"):
            raise _bad(f"the default issuer of {mount} has no key in Vault; it cannot sign")
        log.info(
            "Vault CA provider: reusing the operator's root %s in %s",
            cert.subject.rfc4514_string(),
            mount,
        )
        return issuer_id, cert

    def _generate(
        self,
        options: CAOptions,
        settings: VaultSettings,
        client: hvac.Client,
        gen: str,
        undo: list[tuple[str, Callable[[], Any]]],
    ) -> RootMaterial:
        root_mount, int_mount = settings.root_path, settings.intermediate_path
        td = options.trust_domain.lower()
        signing_uri = str(spiffe.signing_id(td))
        key_params = {"key_type": options.key_type, "key_bits": options.key_bits}

        mounts = self._mounts(client)
        created = []
        if self._ensure_mount(client, mounts, root_mount, options.root_ttl, undo):
            created.append(root_mount)
        if self._ensure_mount(client, mounts, int_mount, options.intermediate_ttl, undo):
            created.append(int_mount)

        # 1. The root: reuse the operator's, or a new issuer + key named for this generation.
        root_name = f"{ROOT_PREFIX}{gen}"
        reused = self._reusable_root(client, root_mount)
        if reused is not None:
            root_id, root = reused
            root_owned = False
        else:
            undo.append(
                (
                    f"delete root {root_name} of {root_mount}",
                    lambda: self._delete_issuer_and_key(client, root_mount, root_name),
                )
            )
            with self._vault(f"generate root in {root_mount}"):
                response = client.write_data(
                    f"{root_mount}/root/generate/internal",
                    data={
                        "common_name": f"Trellis Root CA {gen}",
                        "uri_sans": signing_uri,
                        "exclude_cn_from_sans": True,
                        "ttl": _seconds(options.root_ttl),
                        "issuer_name": root_name,
                        "key_name": root_name,
                        **key_params,
                    },
                )
            data = self._data(response, "generate root")
            root_id = str(data.get("issuer_id") or "")
            root = self._cert(data.get("certificate"), "root")
            root_owned = True

        # 2. The intermediate: a CSR from a new key, signed by the root, imported as an issuer.
        int_name = f"{INTERMEDIATE_PREFIX}{gen}"
        undo.append(
            (
                f"delete intermediate {int_name} of {int_mount}",
                lambda: self._delete_issuer_and_key(client, int_mount, int_name),
            )
        )
        with self._vault(f"generate intermediate CSR in {int_mount}"):
            response = client.write_data(
                f"{int_mount}/intermediate/generate/internal",
                data={
                    "common_name": f"Trellis Intermediate CA {gen}",
                    "uri_sans": signing_uri,
                    "exclude_cn_from_sans": True,
                    "key_name": int_name,
                    **key_params,
                },
            )
        csr = self._data(response, "generate intermediate CSR").get("csr")
        with self._vault(f"sign the intermediate with {root_mount}"):
            response = client.write_data(
                f"{root_mount}/issuer/{root_id}/sign-intermediate",
                data={
                    "csr": csr,
                    "common_name": f"Trellis Intermediate CA {gen}",
                    "use_csr_values": True,
                    "ttl": _seconds(options.intermediate_ttl),
                    # The intermediate signs leaves only, never another CA.
                    "max_path_length": 0,
                },
            )
        intermediate = self._cert(
            self._data(response, "sign intermediate").get("certificate"), "intermediate"
        )
        try:
            intermediate.verify_directly_issued_by(root)
        except (ValueError, TypeError) as e:
            raise _bad(f"the intermediate Vault signed does not chain to the root: {e}") from e
        with self._vault(f"set the signed intermediate in {int_mount}"):
            response = client.write_data(
                f"{int_mount}/intermediate/set-signed", data={"certificate": _pem(intermediate)}
            )
        imported = self._data(response, "set signed intermediate").get("imported_issuers")
        if not isinstance(imported, list) or len(imported) != 1:
            raise _bad(f"Vault imported {imported!r} issuers for the intermediate, expected 1")
        int_id = str(imported[0])
        with self._vault(f"name the intermediate issuer in {int_mount}"):
            client.write_data(
                f"{int_mount}/issuer/{int_id}",
                data={"issuer_name": int_name, "leaf_not_after_behavior": "truncate"},
            )

        # 3. The role: only our trust domain's service identities, profile forced.
        role = f"{ROLE_PREFIX}{gen}"
        undo.append(
            (
                f"delete role {role} of {int_mount}",
                lambda: client.delete(f"{int_mount}/roles/{role}"),
            )
        )
        max_ttl = max(options.leaf_ttl, options.intermediate_ttl)
        with self._vault(f"create role {role} in {int_mount}"):
            client.write_data(
                f"{int_mount}/roles/{role}",
                data={
                    "issuer_ref": int_id,
                    "allowed_uri_sans": [
                        f"spiffe://{td}/ns/{spiffe.DEFAULT_NAMESPACE}/dc/{options.datacenter}/svc/*"
                    ],
                    "allowed_domains": [],
                    "allow_any_name": False,
                    "allow_bare_domains": False,
                    "allow_subdomains": False,
                    "allow_glob_domains": False,
                    "allow_wildcard_certificates": False,
                    "allow_localhost": False,
                    "allow_ip_sans": False,
                    "allowed_other_sans": [],
                    "enforce_hostnames": False,
                    "require_cn": False,
                    "use_csr_common_name": False,
                    "use_csr_sans": True,
                    # Any key Vault can sign; check_csr has already applied our key policy.
                    "key_type": "any",
                    # The built-in provider's profile (trellis.proxy.x509.build_leaf says why).
                    "key_usage": ["DigitalSignature"],
                    "ext_key_usage": [],
                    "server_flag": True,
                    "client_flag": True,
                    "code_signing_flag": False,
                    "email_protection_flag": False,
                    "basic_constraints_valid_for_non_ca": True,
                    "ttl": _seconds(options.leaf_ttl),
                    "max_ttl": _seconds(max_ttl),
                    "no_store": True,
                    "generate_lease": False,
                },
            )

        state = {
            "root_mount": root_mount,
            "intermediate_mount": int_mount,
            "generation": gen,
            "root_issuer_id": root_id,
            "root_owned": root_owned,
            "intermediate_issuer_id": int_id,
            "role": role,
            "mounts_created": created,
            "namespace": settings.namespace or "",
        }
        return RootMaterial(cert=root, signing_chain=(intermediate,), state=state)

    def _keys(self, client: hvac.Client, mount: str) -> dict[str, str]:
        """Key ID -> key name; {} for a missing mount. (Reading a missing key is a 500.)"""
        with self._vault(f"list keys of {mount}"):
            response = client.list(f"{mount}/keys")
        if response is None:
            return {}
        info = self._data(response, f"list keys of {mount}").get("key_info") or {}
        return {
            str(k): str(v.get("key_name") or "") for k, v in info.items() if isinstance(v, dict)
        }

    def _delete_issuer_and_key(self, client: hvac.Client, mount: str, name: str) -> None:
        """Delete the issuers named ``name`` or using the key named ``name``, then the key.
        Found by name, so an object whose creation response was lost is found too."""
        key_ids = {k for k, n in self._keys(client, mount).items() if n == name}
        for issuer_id, info in self._issuers(client, mount).items():
            if info.get("issuer_name") == name or info.get("key_id") in key_ids:
                with self._vault(f"delete issuer {issuer_id} of {mount}"):
                    client.delete(f"{mount}/issuer/{issuer_id}")
        for key_id in key_ids:
            with self._vault(f"delete key {name} of {mount}"):
                client.delete(f"{mount}/key/{key_id}")

    # -- load_root ---------------------------------------------------------------------------

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise _bad("Vault provider state must be an object")
        for key in _STATE_KEYS:
            if not isinstance(state.get(key), str) or not state[key]:
                raise _bad(f"Vault provider state lacks {key!r}; was it made by this provider?")
        if not _GENERATION.match(state["generation"]):
            raise _bad(f"Vault provider state names a bad generation {state['generation']!r}")
        for key in ("root_mount", "intermediate_mount"):
            if not _MOUNT_PATH.match(state[key]):
                raise _bad(f"Vault provider state names a bad mount {state[key]!r}")
        if not isinstance(state.get("namespace", ""), str):
            raise _bad("Vault provider state names a bad namespace")

    def load_root(self, cert: x509.Certificate, state: Mapping[str, Any]) -> None:
        """Check that the generation ``state`` names is in Vault and its root is ``cert``,
        then sign with it. ProviderError if anything is missing or different."""
        settings = self._ready()[1]
        self._check_state(state)
        client = self._client_for(state)
        root_mount, int_mount = state["root_mount"], state["intermediate_mount"]
        root_id, int_id, role = (
            state["root_issuer_id"],
            state["intermediate_issuer_id"],
            state["role"],
        )
        # Listing first: reading a missing issuer is a 500 in Vault, which would look retryable.
        if root_id not in self._issuers(client, root_mount):
            raise _bad(f"Vault at {settings.address}: root issuer {root_id} is not in {root_mount}")
        if int_id not in self._issuers(client, int_mount):
            raise _bad(
                f"Vault at {settings.address}: intermediate issuer {int_id} is not in {int_mount}"
            )
        with self._vault(f"read root issuer {root_id} of {root_mount}"):
            root_data = self._data(client.read(f"{root_mount}/issuer/{root_id}"), "read root")
        root = self._cert(root_data.get("certificate"), "root")
        if px.fingerprint(root) != px.fingerprint(cert):
            raise _bad(
                f"Vault at {settings.address}: the root in {root_mount} ({root_id}) is not the "
                "root this state belongs to"
            )
        with self._vault(f"read intermediate issuer {int_id} of {int_mount}"):
            int_data = self._data(client.read(f"{int_mount}/issuer/{int_id}"), "read issuer")
        intermediate = self._cert(int_data.get("certificate"), "intermediate")
        if not int_data.get("key_id"):
            raise _bad(f"the intermediate issuer {int_id} in {int_mount} has no key")
        try:
            intermediate.verify_directly_issued_by(root)
        except (ValueError, TypeError):
            raise _bad(
                f"the intermediate {int_id} in {int_mount} is not signed by the root"
            ) from None
        with self._vault(f"read role {role} of {int_mount}"):
            response = client.read(f"{int_mount}/roles/{role}")
        if response is None:
            raise _bad(f"Vault at {settings.address}: role {role} is not in {int_mount}")
        role_data = self._data(response, "read role")
        if role_data.get("issuer_ref") not in (
            int_id,
            f"{INTERMEDIATE_PREFIX}{state['generation']}",
        ):
            raise _bad(f"role {role} in {int_mount} does not sign with intermediate {int_id}")
        loaded = _Generation(root, intermediate, dict(state))
        if self._active is None or px.fingerprint(self._active.root) != px.fingerprint(root):
            self._previous, self._active = self._active, loaded

    def check(self) -> None:
        """Ask Vault whether this configuration works before the manager commits it: the token
        is valid (``auth/token/lookup-self``, which Vault's default policy grants, as Consul
        requires) and, once a root is loaded, may sign leaves with its role
        (``sys/capabilities-self``). ProviderError with what Vault answered, never the token."""
        _, settings, client = self._ready()
        with self._vault("look up the token (auth/token/lookup-self)"):
            response = client.auth.token.lookup_self()
        self._data(response, "look up the token")
        gen = self._active
        if gen is None:
            return
        path = f"{gen.intermediate_mount}/sign/{gen.role}"
        with self._vault(f"read the token's capabilities on {path} (sys/capabilities-self)"):
            response = self._client_for(gen.state).write_data(
                "sys/capabilities-self", data={"paths": [path]}
            )
        capabilities = self._data(response, "read the token's capabilities").get(path)
        if not isinstance(capabilities, list) or not {"update", "root"} & set(capabilities):
            raise _bad(
                f"Vault at {settings.address}: the token may not sign leaves: its capabilities"
                f" on {path} are {', '.join(map(str, capabilities or ())) or 'none'}"
                " (signing needs update)"
            )

    # -- signing -----------------------------------------------------------------------------

    def sign_leaf(
        self, csr_pem: str, info: CSRInfo, ttl: dt.timedelta
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Sign a CSR that passed ``check_csr`` with the active generation's role.

        Vault's role checks the URI SAN again (its own allow-list), and the leaf that comes
        back is checked once more: exactly one URI SAN, equal to ``info``'s, cA false, the
        CSR's key. Any mismatch is a ProviderError (defence in depth)."""
        options = self._ready()[0]
        gen = self._active
        if gen is None:
            raise _bad("the Vault CA provider has no root yet (generate_root or load_root)")
        client = self._client_for(gen.state)
        if ttl.total_seconds() < 1:
            raise _bad("the leaf TTL must be positive")
        try:
            csr = px.load_csr(csr_pem)
        except px.PolicyError as e:
            raise _bad(f"cannot sign: {e}") from None
        if not _same_key(csr.public_key(), info.public_key):
            raise _bad("cannot sign: the CSR's key is not the key its check named")
        uri = info.identity.uri
        with self._vault(f"sign a leaf for {uri} with {gen.intermediate_mount}/{gen.role}"):
            response = client.secrets.pki.sign_certificate(
                gen.role,
                csr_pem,
                "",  # hvac requires common_name; a SPIFFE leaf has none
                extra_params={"uri_sans": uri, "ttl": _seconds(ttl), "format": "pem"},
                mount_point=gen.intermediate_mount,
            )
        leaf = self._cert(self._data(response, "sign leaf").get("certificate"), "leaf")
        try:
            identity = px.leaf_identity(leaf)
        except px.PeerRejected as e:
            raise _bad(f"Vault signed a leaf that is not a valid SVID: {e}") from None
        if identity != info.identity or identity.trust_domain != options.trust_domain.lower():
            raise _bad(f"Vault signed a leaf for {identity.uri}, not {uri}")
        if not _same_key(leaf.public_key(), info.public_key):
            raise _bad("Vault signed a leaf for another key than the CSR's")
        try:
            leaf.verify_directly_issued_by(gen.intermediate)
        except (ValueError, TypeError):
            raise _bad(
                "Vault signed the leaf with another issuer than the active intermediate"
            ) from None
        return leaf, (gen.intermediate,)

    # -- cross-signing -----------------------------------------------------------------------

    def supports_cross_signing(self) -> bool:
        return True

    def cross_sign(self, new_root: x509.Certificate) -> x509.Certificate:
        """Have the current Vault root sign ``new_root`` (same subject and key) with
        ``sign-self-issued``. ``new_root`` must be self-issued and, if it names a SPIFFE ID,
        name our trust domain: our root vouches for nothing outside it."""
        options = self._ready()[0]
        signer = self._active
        if signer is not None and px.fingerprint(signer.root) == px.fingerprint(new_root):
            signer = self._previous  # this instance just rotated: the old root vouches
        if signer is None:
            raise _bad("the Vault CA provider has no (other) root to cross-sign with")
        if new_root.subject != new_root.issuer:
            raise _bad("only a self-issued root can be cross-signed (subject must equal issuer)")
        try:
            sans = new_root.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        signing_uri = str(spiffe.signing_id(options.trust_domain))
        if any(u != signing_uri for u in uris):
            raise _bad(f"the new root names {uris}, not our trust domain {signing_uri}")
        root_id = signer.state["root_issuer_id"]
        client = self._client_for(signer.state)
        with self._vault(f"cross-sign a root with {signer.root_mount} issuer {root_id}"):
            response = client.write_data(
                f"{signer.root_mount}/issuer/{root_id}/sign-self-issued",
                data={"certificate": _pem(new_root)},
            )
        cross = self._cert(self._data(response, "sign self-issued").get("certificate"), "cross")
        try:
            cross.verify_directly_issued_by(signer.root)
        except (ValueError, TypeError):
            raise _bad(
                "the cross-signed root Vault returned is not signed by the old root"
            ) from None
        if cross.subject != new_root.subject or not _same_key(
            cross.public_key(), new_root.public_key()
        ):
            raise _bad("the cross-signed root Vault returned is not the new root's subject/key")
        return cross

    # -- cleanup -----------------------------------------------------------------------------

    def cleanup(self, state: Mapping[str, Any]) -> None:
        """Delete what a pruned generation used: its role, its intermediate issuer and key,
        its root issuer and key if we made them, and a mount we enabled that is now empty.
        Idempotent. If it is this provider's active generation, the provider has no root after.
        """
        self._check_state(state)
        client = self._client_for(state)
        gen = state["generation"]
        root_mount, int_mount = state["root_mount"], state["intermediate_mount"]
        # The manager cleans up the generation a provider has just made when it drops it (a
        # lost race to initialise, a failed rotation): then this provider has no root left.
        if self._active is not None and self._active.state.get("generation") == gen:
            self._active = None
        if self._previous is not None and self._previous.state.get("generation") == gen:
            self._previous = None
        role = state["role"]
        if role == f"{ROLE_PREFIX}{gen}":
            with self._vault(f"delete role {role} of {int_mount}"):
                client.delete(f"{int_mount}/roles/{role}")
        self._delete_owned(
            client, int_mount, state["intermediate_issuer_id"], gen, INTERMEDIATE_PREFIX
        )
        if state.get("root_owned") is True:
            self._delete_owned(client, root_mount, state["root_issuer_id"], gen, ROOT_PREFIX)
        mounts = self._mounts(client)
        for path in dict.fromkeys((int_mount, root_mount)):
            mount = mounts.get(path)
            if mount is None or mount.get("description") != MOUNT_MARK:
                continue
            if self._issuers(client, path):
                continue
            with self._vault(f"disable mount {path}"):
                client.sys.disable_secrets_engine(path)
            log.info("Vault CA provider: disabled the emptied mount %s", path)
        log.info("Vault CA provider: cleaned up generation %s", gen)

    def _delete_owned(
        self, client: hvac.Client, mount: str, issuer_id: str, gen: str, prefix: str
    ) -> None:
        """Delete an issuer and its key, but only if it carries our name for ``gen``."""
        info = self._issuers(client, mount).get(issuer_id)
        if info is None:
            return  # already gone
        name = f"{prefix}{gen}"
        if info.get("issuer_name") != name:
            log.warning(
                "Vault CA provider: not deleting issuer %s of %s: it is named %r, not %r",
                issuer_id,
                mount,
                info.get("issuer_name"),
                name,
            )
            return
        self._delete_issuer_and_key(client, mount, name)
