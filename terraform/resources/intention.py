"""``trellis_intention``: one intention, ``source => destination``, owned by one resource.

One resource per pair (not one per destination listing every source), so each team declares
and owns the intentions of its own services. The pair is the resource's identity: it is read
by pair (``/v1/connect/intentions/exact``), so an intention deleted and re-made outside
Terraform is found again (its new ID goes to state) rather than planned for creation, and a
change of ``source`` or ``destination`` replaces the resource. Import ID: ``SOURCE/DESTINATION``
(``web/db``; ``*`` for the wildcard), or the intention's UUID.
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

#: The API's field names in a 400's message, and the attribute each comes from.
FIELDS = {
    "SourceName": "source",
    "DestinationName": "destination",
    "Action": "action",
    "Description": "description",
    "Meta": "meta",
}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def _label(state: dict[str, Any]) -> str:
    return f"intention {state.get('source')} => {state.get('destination')}"


def _hint(destination: Any) -> str:
    return f'service "{destination}" {{ intentions = "write" }}'


class IntentionResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "intention"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            version=1,
            description="An intention: may `source` open connections to `destination`? "
            "Import ID: `SOURCE/DESTINATION`.",
            attributes=[
                schema.Attribute("id", types.String(), computed=True, description="The UUID."),
                schema.Attribute(
                    "source",
                    types.String(),
                    required=True,
                    requires_replace=True,
                    description="The calling service's name, or `*` for any service.",
                ),
                schema.Attribute(
                    "destination",
                    types.String(),
                    required=True,
                    requires_replace=True,
                    description="The called service's name, or `*` for any service.",
                ),
                schema.Attribute(
                    "action", types.String(), required=True, description="`allow` or `deny`."
                ),
                schema.Attribute(
                    "description",
                    types.String(),
                    optional=True,
                    description="For people; at most 512 characters.",
                ),
                schema.Attribute(
                    "meta",
                    types.Map(types.String()),
                    optional=True,
                    description="Free-form key/value metadata (at most 64 keys).",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "source", validation.service_name)
        check(diags, config, "destination", validation.service_name)
        check(diags, config, "action", validation.intention_action)
        check(diags, config, "description", validation.description)
        check(diags, config, "meta", validation.intention_meta)

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        src, dst = planned["source"], planned["destination"]
        try:
            new_id = api.intention_create(
                src,
                dst,
                planned["action"],
                description=planned.get("description") or "",
                meta=planned.get("meta") or None,
            )
        except APIError as e:
            self._error(
                ctx.diagnostics,
                e,
                f"create {_label(planned)}",
                dst,
                conflict=f"An intention from {src} to {dst} exists already, made outside this "
                "configuration (or by another one); there is one intention per pair. Import "
                f"it (terraform import {ctx.type_name}.NAME {src}/{dst}) or delete it first.",
            )
            return None
        return {**planned, "id": new_id}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            found = api.intention_get_exact(current["source"], current["destination"]).value
        except APIError as e:
            self._error(ctx.diagnostics, e, f"read {_label(current)}", current["destination"])
            return current
        return None if found is None else self._state(found, current)

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        # By pair: the pair is the identity (source and destination force a replacement, so
        # they are the same in current and planned), and an intention deleted since the plan
        # is put back rather than failing with a 404.
        try:
            api.intention_upsert_exact(
                planned["source"],
                planned["destination"],
                planned["action"],
                description=planned.get("description") or "",
                meta=planned.get("meta") or None,
            )
        except APIError as e:
            self._error(ctx.diagnostics, e, f"update {_label(planned)}", planned["destination"])
            return current
        return planned

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            # Nothing to delete (deleted outside Terraform meanwhile) is not an error.
            api.intention_delete_exact(current["source"], current["destination"])
        except APIError as e:
            self._error(ctx.diagnostics, e, f"delete {_label(current)}", current["destination"])
            return current
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        found: dict[str, Any] | None
        try:
            if _UUID.match(id):
                found = api.intention_get(id)
            else:
                src, sep, dst = id.partition("/")
                problem = (
                    None
                    if sep and "/" not in dst
                    else "use SOURCE/DESTINATION (web/db) or the intention's UUID"
                )
                problem = problem or validation.service_name(src)
                problem = problem or validation.service_name(dst)
                if problem:
                    ctx.diagnostics.add_error(f"Invalid import ID {id!r}", problem)
                    return None
                found = api.intention_get_exact(src, dst).value
        except APIError as e:
            api_error(ctx.diagnostics, e, f"import intention {id}")
            return None
        if found is None:
            ctx.diagnostics.add_error(
                f"Cannot import intention {id}: there is none",
                "Check the names (they are case-sensitive) with `trellis intention list`.",
            )
            return None
        return self._state(found, None)

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _state(found: dict[str, Any], current: State | None) -> State:
        current = current or {}
        return {
            "id": str(found.get("ID", "")),
            "source": found.get("SourceName", ""),
            "destination": found.get("DestinationName", ""),
            "action": found.get("Action", ""),
            "description": same_or(current.get("description"), found.get("Description") or "", ""),
            "meta": same_or(current.get("meta"), dict(found.get("Meta") or {}), {}),
        }

    @staticmethod
    def _error(
        diags: Diagnostics, e: APIError, doing: str, destination: Any, *, conflict: str = ""
    ) -> None:
        api_error(
            diags,
            e,
            doing,
            attribute="action",
            fields=FIELDS,
            hint=_hint(destination),
            conflict=conflict,
        )
