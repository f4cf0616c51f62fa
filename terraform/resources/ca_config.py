"""``trellis_ca_config``: the Connect CA's provider (``connect_provider``: built-in or Vault), its
settings and TTLs. (``provider`` is a meta-argument of every Terraform resource, hence the name.)

There is one CA configuration per cluster, and it always exists (the server makes the built-in
one at its first start), so this resource does not make one: creating it writes the declared
configuration over the cluster's, and import ID ``connect-ca`` adopts it as it is.

**Rotation.** A change of the provider, the key type or size, or (Vault) the address or mount
paths needs a new root: the server rotates it, cross-signing where the old CA can. The plan
says so as a replacement would: a warning (``... replaces the CA root``) naming the fields, and
``root_id`` becomes "known after apply". The warning comes from ``validate``, which Terraform
calls again once the provider is configured at plan time, comparing the configuration with
the server's, so a creation that rotates warns as well (the tf framework asks for no plan on
creation). TTLs, rate limits and Vault credentials change without a new root.

**The Vault token.** The server never returns it. Given as ``vault_token`` (sensitive) it is
hidden from plans and ``terraform show`` but held in the state, as every attribute is. Given as
``vault_token_file`` (a file the provider reads at apply) or ``vault_token_env`` (the name of an
environment variable of the provider's process), only that name is in the state, never the
token. The provider cannot see the token file change: to push a new token, run
``terraform apply -replace=trellis_ca_config.NAME`` (the same root fields: no rotation).

**Destroy** removes the resource from the state only, with a warning, and leaves the CA as
it is: a cluster cannot be without a CA, and "back to the defaults" would rotate the root under
every running sidecar, an outage a ``terraform destroy`` should not cause by surprise. To go
back to the built-in CA, declare ``connect_provider = "consul"`` and apply.

Values are compared by meaning: ``72h`` and ``4320m``, ``consul`` and
``builtin``; a setting left out of the configuration is the server's default, and a value
other than the default found on the server shows as drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tf import schema, types
from tf.iface import (
    Config,
    CreateContext,
    DeleteContext,
    ImportContext,
    PlanContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.types import Unknown
from tf.utils import Diagnostics

from trellis.proxy.client import APIError, Client
from trellis.proxy.durations import DurationError, parse_duration
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.provider import TrellisProvider

IMPORT_ID = "connect-ca"
HINT = 'operator = "write"'
PROVIDERS = {"consul": "builtin", "builtin": "builtin", "vault": "vault"}

#: attribute -> (API field in Config, the server's default, providers it belongs to).
SETTINGS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "leaf_cert_ttl": ("LeafCertTTL", "72h", ("builtin", "vault")),
    "intermediate_cert_ttl": ("IntermediateCertTTL", "8760h", ("builtin", "vault")),
    "root_cert_ttl": ("RootCertTTL", "87600h", ("builtin", "vault")),
    "private_key_type": ("PrivateKeyType", "ec", ("builtin", "vault")),
    "private_key_bits": ("PrivateKeyBits", 256, ("builtin", "vault")),
    "csr_max_per_second": ("CSRMaxPerSecond", 50, ("builtin", "vault")),
    "csr_max_concurrent": ("CSRMaxConcurrent", 0, ("builtin", "vault")),
    "vault_address": ("Address", None, ("vault",)),
    "vault_root_pki_path": ("RootPKIPath", None, ("vault",)),
    "vault_intermediate_pki_path": ("IntermediatePKIPath", None, ("vault",)),
    "vault_ca_file": ("CAFile", None, ("vault",)),
    "vault_tls_server_name": ("TLSServerName", None, ("vault",)),
    "vault_tls_skip_verify": ("TLSSkipVerify", False, ("vault",)),
    "vault_namespace": ("Namespace", None, ("vault",)),
}
DURATIONS = ("leaf_cert_ttl", "intermediate_cert_ttl", "root_cert_ttl")
#: What needs a new root (the server's ROOT_FIELDS, api/ca/manager.py), besides the provider.
ROOT_ATTRIBUTES = (
    "private_key_type",
    "private_key_bits",
    "vault_address",
    "vault_root_pki_path",
    "vault_intermediate_pki_path",
)
TOKEN_SOURCES = ("vault_token", "vault_token_file", "vault_token_env")
FIELDS = {api: attr for attr, (api, _, _) in SETTINGS.items()} | {
    "Provider": "connect_provider",
    "Token": "vault_token",
    "ForceWithoutCrossSigning": "force_without_cross_signing",
}


def _same(attr: str, a: Any, b: Any) -> bool:
    """Whether two values of ``attr`` mean the same (durations by length, numbers by value)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    if attr in DURATIONS:
        try:
            return parse_duration(str(a)) == parse_duration(str(b))
        except DurationError:
            return False
    if attr == "connect_provider":
        return PROVIDERS.get(a) == PROVIDERS.get(b) is not None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return False


def effective(state: dict[str, Any], attr: str) -> Any:
    """The value ``attr`` has on the server for this declaration (unset: the default)."""
    value = state.get(attr)
    return SETTINGS[attr][1] if value is None and attr in SETTINGS else value


def root_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The attributes whose change from ``old`` to ``new`` makes the server rotate the root."""
    if not _same("connect_provider", old.get("connect_provider"), new.get("connect_provider")):
        return ["connect_provider"]
    vault = PROVIDERS.get(new.get("connect_provider") or "") == "vault"
    return [
        a
        for a in ROOT_ATTRIBUTES
        if (vault or not a.startswith("vault_"))
        and new.get(a) is not Unknown
        and not _same(a, effective(old, a), effective(new, a))
    ]


class CAConfigResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "ca_config"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        def opt(name: str, t: Any, description: str, **kw: Any) -> schema.Attribute:
            return schema.Attribute(name, t, optional=True, description=description, **kw)

        return schema.Schema(
            version=1,
            description="The cluster's Connect CA configuration. Import ID: `connect-ca`. "
            "Destroy forgets it (the CA stays as it is).",
            attributes=[
                schema.Attribute("id", types.String(), computed=True),
                schema.Attribute(
                    "connect_provider",
                    types.String(),
                    required=True,
                    description="`consul` (the built-in CA; alias `builtin`) or `vault`.",
                ),
                opt("leaf_cert_ttl", types.String(), "Leaf lifetime (default 72h)."),
                opt("intermediate_cert_ttl", types.String(), "Default 8760h."),
                opt("root_cert_ttl", types.String(), "Default 87600h."),
                opt("private_key_type", types.String(), "`ec` (default) or `rsa`; rotates."),
                opt("private_key_bits", types.Number(), "Default 256; rotates."),
                opt("csr_max_per_second", types.Number(), "CSR rate limit (default 50; 0: none)."),
                opt("csr_max_concurrent", types.Number(), "Concurrent signings (default 0: none)."),
                opt("vault_address", types.String(), "Vault's address; rotates."),
                opt("vault_root_pki_path", types.String(), "Root PKI mount; rotates."),
                opt("vault_intermediate_pki_path", types.String(), "Intermediate mount; rotates."),
                opt("vault_ca_file", types.String(), "CA bundle verifying Vault (on the server)."),
                opt("vault_tls_server_name", types.String(), "TLS server name for Vault."),
                opt("vault_tls_skip_verify", types.Bool(), "No TLS verification of Vault."),
                opt("vault_namespace", types.String(), "Vault namespace."),
                opt(
                    "vault_token",
                    types.String(),
                    "The Vault token. Sensitive, but held in the state: prefer "
                    "vault_token_file or vault_token_env.",
                    sensitive=True,
                ),
                opt(
                    "vault_token_file",
                    types.String(),
                    "A file holding the Vault token, read by the provider at apply; the "
                    "token is not in the state.",
                ),
                opt(
                    "vault_token_env",
                    types.String(),
                    "The name of an environment variable holding the Vault token; the token "
                    "is not in the state.",
                ),
                opt(
                    "force_without_cross_signing",
                    types.Bool(),
                    "Rotate even when the old CA cannot cross-sign the new root.",
                ),
                schema.Attribute(
                    "root_id",
                    types.String(),
                    computed=True,
                    description="The active root's ID (changes when the root rotates).",
                ),
            ],
        )

    # -- plan -----------------------------------------------------------------------------------

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        name = config.get("connect_provider")
        if validation.known(name) and name not in PROVIDERS:
            diags.add_error(
                "Invalid connect_provider",
                f"connect_provider must be consul (alias builtin) or vault, not {name!r}",
                path=["connect_provider"],
            )
            return
        for attr in DURATIONS:
            value = config.get(attr)
            if validation.known(value):
                try:
                    parse_duration(value)
                except DurationError as e:
                    diags.add_error(
                        f"Invalid {attr}", f"{e} (write a duration such as 72h)", path=[attr]
                    )
        kind = config.get("private_key_type")
        if validation.known(kind) and kind not in ("ec", "rsa"):
            diags.add_error(
                "Invalid private_key_type", "must be ec or rsa", path=["private_key_type"]
            )
        if not validation.known(name):
            return
        given = [t for t in TOKEN_SOURCES if config.get(t) is not None]
        if PROVIDERS[name] == "vault":
            if config.get("vault_address") is None:
                diags.add_error(
                    "vault_address is required",
                    "The vault provider needs Vault's address.",
                    path=["vault_address"],
                )
            if len(given) != 1:
                diags.add_error(
                    "Give the Vault token exactly one way",
                    "Set one of vault_token_file, vault_token_env (neither puts the token in "
                    f"the state) or vault_token; this configuration sets {len(given)}.",
                    path=[given[1] if len(given) > 1 else "vault_token_file"],
                )
        else:
            for attr in [*given, *(a for a in SETTINGS if a.startswith("vault_"))]:
                if config.get(attr) is not None:
                    diags.add_error(
                        f"{attr} is a setting of the vault provider",
                        f"connect_provider is {name}; remove {attr}, or set "
                        'connect_provider = "vault".',
                        path=[attr],
                    )
        self._warn_rotation(diags, type_name, config)

    def _warn_rotation(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        """At plan time (the provider configured): warn when applying rotates the root."""
        if self.provider.client is None or any(v is Unknown for v in config.values()):
            return
        try:
            server = self._server_state(self.provider.client, {})
        except APIError:
            return  # the read in the plan reports it
        changed = root_changes(server, dict(config))
        if changed:
            diags.add_warning(
                f"{type_name}: this apply replaces the CA root",
                f"{', '.join(changed)} differ from the server's CA configuration, and a new "
                "value needs a new root: the server generates one and makes it active "
                f"(the old root, {server.get('root_id')}, is cross-signed where the old CA can; "
                "sidecars fetch the new root and get new leaves). Nothing about existing "
                "connections changes, but every certificate is re-issued.",
                path=[changed[0]],
            )

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State | None:
        if current is None:
            return planned
        for attr in ("connect_provider", *SETTINGS):
            if _same(attr, current.get(attr), planned.get(attr)):
                planned[attr] = current.get(attr)  # the same meaning: keep the prior spelling
        if root_changes(current, planned):
            planned["root_id"] = Unknown
        return planned

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        state = self._write(ctx.diagnostics, planned, "set the CA configuration")
        return None if state is None else {**state, "id": IMPORT_ID}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            return self._server_state(api, current)
        except APIError as e:
            api_error(ctx.diagnostics, e, "read the CA configuration", hint=HINT)
            return current

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        state = self._write(ctx.diagnostics, planned, "update the CA configuration")
        return current if state is None else state

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        ctx.diagnostics.add_warning(
            "The CA configuration stays as it is",
            "Destroying trellis_ca_config only removes it from the state: a cluster always "
            "has a CA, and resetting it would rotate the root under every sidecar. To go "
            'back to the built-in CA, declare connect_provider = "consul" and apply instead.',
        )
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        if id != IMPORT_ID:
            ctx.diagnostics.add_error(
                f"Invalid import ID {id!r}",
                f"There is one CA configuration per cluster: import it as {IMPORT_ID!r}.",
            )
            return None
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        try:
            return self._server_state(api, {})
        except APIError as e:
            api_error(ctx.diagnostics, e, "import the CA configuration", hint=HINT)
            return None

    # -- helpers --------------------------------------------------------------------------------

    def _token(self, diags: Diagnostics, planned: State) -> str | None:
        """The Vault token from whichever source the configuration names (None: none, or an
        error was added)."""
        if planned.get("vault_token"):
            return str(planned["vault_token"])
        if planned.get("vault_token_file"):
            path = planned["vault_token_file"]
            try:
                token = Path(path).read_text().strip()
            except OSError as e:
                diags.add_error(
                    "Cannot read vault_token_file",
                    f"{path}: {e.strerror or e}. The provider reads it where Terraform runs.",
                    path=["vault_token_file"],
                )
                return None
            if not token:
                diags.add_error("vault_token_file is empty", path, path=["vault_token_file"])
                return None
            return token
        if planned.get("vault_token_env"):
            name = planned["vault_token_env"]
            token = self.provider.env.get(name, "").strip()
            if not token:
                diags.add_error(
                    "The Vault token's environment variable is not set",
                    f"vault_token_env = {name!r}, but the environment Terraform runs in has "
                    f"no {name} (or it is empty). Export it before running terraform.",
                    path=["vault_token_env"],
                )
                return None
            return token
        return None

    def _write(self, diags: Diagnostics, planned: State, doing: str) -> State | None:
        api = self.provider.api(diags)
        if api is None:
            return None
        name = PROVIDERS[planned["connect_provider"]]
        config: dict[str, Any] = {}
        for attr, (field, _, providers) in SETTINGS.items():
            value = planned.get(attr)
            if value is not None and name in providers:
                config[field] = (
                    int(value) if attr in ("private_key_bits", "csr_max_concurrent") else value
                )
        if name == "vault":
            token = self._token(diags, planned)
            if diags.has_errors():
                return None
            if token is not None:
                config["Token"] = token
        body: dict[str, Any] = {"Provider": name, "Config": config}
        if planned.get("force_without_cross_signing"):
            body["ForceWithoutCrossSigning"] = True
        try:
            api.ca_set_config(body)
            root_id = api.ca_roots().value.get("ActiveRootID", "")
        except APIError as e:
            api_error(diags, e, doing, attribute="connect_provider", fields=FIELDS, hint=HINT)
            return None
        # A root the plan knew stays (a rotation by someone else shows at the next refresh).
        known = planned.get("root_id") not in (None, Unknown)
        return {**planned, "root_id": planned["root_id"] if known else root_id}

    @staticmethod
    def _server_state(api: Client, current: State) -> State:
        """The server's configuration in the resource's terms, through ``current``'s
        spelling: a value that means the same keeps it, and a default stays unset."""
        got = api.ca_get_config()
        root_id = api.ca_roots().value.get("ActiveRootID", "")
        name = str(got.get("Provider", ""))
        config = got.get("Config") or {}
        state: dict[str, Any] = {
            "id": IMPORT_ID,
            "connect_provider": current["connect_provider"]
            if _same("connect_provider", current.get("connect_provider"), name)
            else name,
            "root_id": root_id,
        }
        for attr, (field, default, providers) in SETTINGS.items():
            value = config.get(field) if name in providers else None
            if value == "" and default is None:
                value = None
            mine = current.get(attr)
            if _same(attr, mine, value):
                state[attr] = mine
            elif mine is None and _same(attr, default, value):
                state[attr] = None
            else:
                state[attr] = value
        for attr in (*TOKEN_SOURCES, "force_without_cross_signing"):
            state[attr] = current.get(attr)
        return state
