"""``trellis_key``: one K/V key: its path, value (text) and flags.

``cas = true`` protects the key with check-and-set: creation refuses to overwrite a key that
exists already (one made outside Terraform, or by another configuration), and an update or a
delete goes through only if the key has not changed since Terraform last read it
(``modify_index``, the key's ``ModifyIndex`` as of the last refresh). Without ``cas`` the
provider writes unconditionally, as ``trellis kv put`` does. Either way, a value changed
outside Terraform shows in the next plan and the next apply puts the declared value back; a
deleted key is planned for creation. Import ID: the key path.
"""

from __future__ import annotations

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

from trellis.proxy.client import APIError, Client, KVPair
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check, same_or
from trellis.terraform.provider import TrellisProvider

#: What a write changes on the server (and so the key's ModifyIndex).
_WRITTEN = ("value", "flags")


def _hint(path: Any) -> str:
    return f'key "{path}" {{ policy = "write" }}'


def _text(value: bytes | None) -> str:
    # A value written outside Terraform may not be UTF-8; the replacement characters make it
    # differ from any configured text, so the plan shows it and the apply puts the text back.
    return "" if value is None else value.decode("utf-8", errors="replace")


class KeyResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "key"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            version=1,
            description="One K/V key. Import ID: the key path.",
            attributes=[
                schema.Attribute("id", types.String(), computed=True, description="The path."),
                schema.Attribute(
                    "path",
                    types.String(),
                    required=True,
                    requires_replace=True,
                    description="The key, without a leading `/` (`config/web/port`).",
                ),
                schema.Attribute(
                    "value", types.String(), required=True, description="The value, as text."
                ),
                schema.Attribute(
                    "flags",
                    types.Number(),
                    optional=True,
                    description="An unsigned 64-bit number kept with the key (default 0).",
                ),
                schema.Attribute(
                    "cas",
                    types.Bool(),
                    optional=True,
                    description="Check-and-set: never overwrite a key that exists already or "
                    "changed since Terraform last read it.",
                ),
                schema.Attribute(
                    "modify_index",
                    types.Number(),
                    computed=True,
                    description="The key's ModifyIndex when Terraform last read or wrote it.",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "path", validation.key_path)
        check(diags, config, "flags", validation.flags)

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State | None:
        # A write changes the key's ModifyIndex: say so, or Terraform would refuse the new
        # index after the apply as an inconsistent result.
        if current is not None and ctx.changed_fields & set(_WRITTEN):
            planned["modify_index"] = Unknown
        return planned

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        path = planned["path"]
        cas = 0 if planned.get("cas") else None
        written = self._put(
            api,
            ctx.diagnostics,
            planned,
            cas,
            f"create key {path}",
            conflict=f"The key {path} exists already, and cas = true refuses to overwrite it. "
            f"Import it (terraform import {ctx.type_name}.NAME {path}), delete it, or drop cas.",
        )
        if written is None:
            return None
        return {**planned, "id": path, "modify_index": written.modify_index}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            pair = api.kv_get(current["path"]).value
        except APIError as e:
            api_error(ctx.diagnostics, e, f"read key {current['path']}", attribute="path")
            return current
        return None if pair is None else self._state(pair, current)

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        if all(current.get(k) == planned.get(k) for k in _WRITTEN):
            return planned  # only cas changed: nothing to write
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        path = planned["path"]
        cas = int(current["modify_index"]) if planned.get("cas") else None
        written = self._put(
            api,
            ctx.diagnostics,
            planned,
            cas,
            f"update key {path}",
            conflict=f"The key {path} changed after Terraform read it (its ModifyIndex is no "
            f"longer {cas}), and cas = true refuses to overwrite that change. Run terraform "
            "plan again to see it.",
        )
        if written is None:
            return current
        return {**planned, "modify_index": written.modify_index}

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        path = current["path"]
        cas = int(current["modify_index"]) if current.get("cas") else None
        try:
            done = api.kv_delete(path, cas=cas)
        except APIError as e:
            api_error(ctx.diagnostics, e, f"delete key {path}", attribute="path", hint=_hint(path))
            return current
        if not done:
            ctx.diagnostics.add_error(
                f"Cannot delete key {path}: conflict",
                f"The key changed after Terraform read it (its ModifyIndex is no longer {cas}), "
                "and cas = true refuses to delete that change. Run terraform plan again.",
            )
            return current
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        problem = validation.key_path(id)
        if problem:
            ctx.diagnostics.add_error(f"Invalid import ID {id!r}", problem)
            return None
        try:
            pair = api.kv_get(id).value
        except APIError as e:
            api_error(ctx.diagnostics, e, f"import key {id}")
            return None
        if pair is None:
            ctx.diagnostics.add_error(
                f"Cannot import key {id}: there is none", "Check the path with `trellis kv get`."
            )
            return None
        return self._state(pair, None)

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _state(pair: KVPair, current: State | None) -> State:
        current = current or {}
        return {
            "id": pair.key,
            "path": pair.key,
            "value": _text(pair.value),
            "flags": same_or(current.get("flags"), pair.flags, 0),
            "cas": current.get("cas"),
            "modify_index": pair.modify_index,
        }

    @staticmethod
    def _put(
        api: Client,
        diags: Diagnostics,
        planned: State,
        cas: int | None,
        doing: str,
        *,
        conflict: str,
    ) -> KVPair | None:
        """Write the planned value; the key as written (for its ModifyIndex), or None."""
        path = planned["path"]
        flags = planned.get("flags")
        try:
            ok = api.kv_put(
                path,
                planned["value"],
                flags=None if flags is None else int(flags),
                cas=cas,
            )
            if not ok:
                diags.add_error(f"Cannot {doing}: conflict", conflict)
                return None
            written = api.kv_get(path).value
        except APIError as e:
            api_error(
                diags,
                e,
                doing,
                attribute="value",
                fields={"key": "path", "Value": "value"},
                hint=_hint(path),
                conflict=conflict,
            )
            return None
        if written is None:
            diags.add_error(
                f"Cannot {doing}: the key was deleted right after it was written",
                "Something else deletes this key; find it before applying again.",
            )
        return written
