"""``trellis_acl_token``: an ACL token (description, policies by name, local).

Policies are named, not given by ID: names are what people write and read in rules and
reviews, a ``trellis_acl_policy``'s ``name`` can be referenced directly, and the server keeps
the link by ID, so renaming a policy through its resource shows on the token as the new name.

``accessor_id`` (also ``id``) is the token's public identifier. ``secret_id`` is the secret
itself: a sensitive computed attribute, never shown in a plan or by ``terraform show``, but
held in the state in plain text (every provider's attributes are, sensitive or not), because
the server returns it once, at creation, and keeps only a hash of it. So whoever can read the
state can use the token; terraform/README.md says how to avoid that (a protected backend, or a
token made outside Terraform and imported: an imported token's ``secret_id`` is empty, since no
read can return it). Import ID: the accessor ID.
"""

from __future__ import annotations

import re
from typing import Any

from tf import schema, types
from tf.iface import (
    Config,
    CreateContext,
    DeleteContext,
    ImportContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.utils import Diagnostics

from trellis.proxy.client import APIError
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check, same_or
from trellis.terraform.provider import TrellisProvider

FIELDS = {"Description": "description", "Policies": "policies", "Local": "local"}
HINT = 'acl = "write"'
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def _label(state: dict[str, Any]) -> str:
    return f"ACL token {state.get('accessor_id') or ''}".rstrip()


class ACLTokenResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "acl_token"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            version=1,
            description="An ACL token. Import ID: its accessor ID.",
            attributes=[
                schema.Attribute(
                    "id", types.String(), computed=True, description="The accessor ID."
                ),
                schema.Attribute(
                    "accessor_id",
                    types.String(),
                    computed=True,
                    description="The token's public identifier.",
                ),
                schema.Attribute(
                    "secret_id",
                    types.String(),
                    computed=True,
                    sensitive=True,
                    description="The secret (empty after an import: the server never returns "
                    "it again). Held in the state.",
                ),
                schema.Attribute(
                    "description",
                    types.String(),
                    optional=True,
                    description="For people; at most 512 characters.",
                ),
                schema.Attribute(
                    "policies",
                    types.Set(types.String()),
                    optional=True,
                    description="The names of the policies the token holds.",
                ),
                schema.Attribute(
                    "local",
                    types.Bool(),
                    optional=True,
                    description="Valid in this datacenter only (default false).",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "description", validation.description)
        policies = config.get("policies")
        if validation.known(policies):
            for name in policies:
                problem = validation.policy_name(name)
                if problem:
                    diags.add_error("Invalid policies", problem, path=["policies"])

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        try:
            made = api.acl_token_create(
                description=planned.get("description") or "",
                policy_names=sorted(planned.get("policies") or ()),
                local=bool(planned.get("local")),
            )
        except APIError as e:
            self._error(ctx.diagnostics, e, "create ACL token")
            return None
        aid = made["AccessorID"]
        return {**planned, "id": aid, "accessor_id": aid, "secret_id": made["SecretID"]}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            found = api.acl_token_read(current["accessor_id"])
        except APIError as e:
            if _gone(api, e):
                return None
            self._error(ctx.diagnostics, e, f"read {_label(current)}")
            return current
        return self._state(found, current)

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            api.acl_token_update(
                current["accessor_id"],
                description=planned.get("description") or "",
                policies=[{"Name": n} for n in sorted(planned.get("policies") or ())],
                local=bool(planned.get("local")),
            )
        except APIError as e:
            self._error(ctx.diagnostics, e, f"update {_label(current)}")
            return current
        return planned

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            api.acl_token_delete(current["accessor_id"])
        except APIError as e:
            if e.status != 404:
                self._error(ctx.diagnostics, e, f"delete {_label(current)}")
                return current
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        if not _UUID.match(id):
            ctx.diagnostics.add_error(
                f"Invalid import ID {id!r}",
                "A token is imported by its accessor ID (a UUID, `trellis acl token list`), "
                "never by its secret.",
            )
            return None
        try:
            found = api.acl_token_read(id)
        except APIError as e:
            if _gone(api, e):
                ctx.diagnostics.add_error(
                    f"Cannot import ACL token {id}: there is none",
                    "Check the accessor ID with `trellis acl token list`.",
                )
            else:
                self._error(ctx.diagnostics, e, f"import ACL token {id}")
            return None
        return self._state(found, None)

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _state(found: dict[str, Any], current: State | None) -> State:
        current = current or {}
        names = sorted(str(p.get("Name", "")) for p in found.get("Policies") or [])
        return {
            "id": found["AccessorID"],
            "accessor_id": found["AccessorID"],
            # Never returned by a read: what the creation returned, or nothing (imported).
            "secret_id": current.get("secret_id"),
            "description": same_or(current.get("description"), found.get("Description") or "", ""),
            "policies": same_or(current.get("policies"), names, []),
            "local": same_or(current.get("local"), bool(found.get("Local")), False),
        }

    @staticmethod
    def _error(diags: Diagnostics, e: APIError, doing: str) -> None:
        api_error(
            diags,
            e,
            doing,
            attribute="policies",
            fields=FIELDS,
            hint=HINT,
            conflict="A token with this accessor ID exists already.",
        )


def _gone(api: Any, e: APIError) -> bool:
    """Whether a failed token read means the token does not exist. As Consul does, the server
    answers that with 403 "ACL not found" (older Trellis servers: 404), which is also its
    answer when the provider's own token is unknown; so a 403 counts only if the provider's
    token still reads itself."""
    if e.status == 404:
        return True
    if e.status != 403 or "ACL not found" not in e.message:
        return False
    try:
        api.acl_token_self()
    except APIError:
        return False
    return True
