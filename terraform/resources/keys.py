"""``trellis_keys``: every key under a path prefix, declared as one map.

``path_prefix`` (``config/web/``, ending in ``/``) and ``values``, a map from the key's path
under the prefix (``port``, ``db/host``) to its text; ``flags`` an optional map of the same
relative paths to flags (0 for a key it does not name). The keys the resource declares are
its own: a value changed outside Terraform shows in the next plan and is put back, a declared
key deleted is written again, and a key removed from ``values`` is deleted.

Keys under the prefix that ``values`` does not name belong to someone else by default: they
are listed in ``undeclared`` (computed) and left alone. With ``delete_undeclared = true`` the
resource owns the whole prefix, and deletes them, but only through a plan that shows it: the
plan sets ``undeclared`` to ``[]`` (``~ undeclared = ["config/web/old"] -> []``) and warns with
the list. At creation the tf framework asks the provider for no plan, so the first apply only
records the undeclared keys; the plan after it shows their deletion. Nothing is ever deleted
that a plan did not list.

Destroying the resource deletes the keys it declares, never the undeclared ones. Import ID: the
prefix (every key under it becomes declared).
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
from trellis.terraform.fields import check
from trellis.terraform.provider import TrellisProvider


def _hint(prefix: Any) -> str:
    return f'key_prefix "{prefix}" {{ policy = "write" }}'


def _text(value: bytes | None) -> str:
    # Not UTF-8 (written outside Terraform): replacement characters, so it differs from any
    # configured text and the next apply puts the text back.
    return "" if value is None else value.decode("utf-8", errors="replace")


def _flags_of(flags: Any, rel: str) -> int:
    return int((flags or {}).get(rel) or 0)


class KeysResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "keys"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            version=1,
            description="Every key under a path prefix. Import ID: the prefix.",
            attributes=[
                schema.Attribute("id", types.String(), computed=True, description="The prefix."),
                schema.Attribute(
                    "path_prefix",
                    types.String(),
                    required=True,
                    requires_replace=True,
                    description="The prefix, ending in `/` (`config/web/`).",
                ),
                schema.Attribute(
                    "values",
                    types.Map(types.String()),
                    required=True,
                    description="Key path under the prefix -> value (text).",
                ),
                schema.Attribute(
                    "flags",
                    types.Map(types.Number()),
                    optional=True,
                    description="Key path under the prefix -> flags (0 for keys not named).",
                ),
                schema.Attribute(
                    "delete_undeclared",
                    types.Bool(),
                    optional=True,
                    description="Delete keys under the prefix that `values` does not name "
                    "(listed in the plan first). Default false: they are left alone.",
                ),
                schema.Attribute(
                    "undeclared",
                    types.List(types.String()),
                    computed=True,
                    description="Keys under the prefix that `values` does not name (full "
                    "paths), as of the last refresh.",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "path_prefix", validation.key_prefix)
        prefix = config.get("path_prefix")
        values, flags = config.get("values"), config.get("flags")
        if validation.known(values):
            for rel in values:
                # The whole path when the prefix is good (its own error is said once).
                good = validation.known(prefix) and validation.key_prefix(prefix) is None
                full = prefix + rel if good else rel
                problem = validation.relative_key(rel) or validation.key_path(full)
                if problem:
                    diags.add_error("Invalid key in values", problem, path=["values"])
        if validation.known(flags):
            for rel, value in flags.items():
                problem = validation.flags(value)
                if problem is None and validation.known(values) and rel not in values:
                    problem = f"flags names {rel!r}, which values does not declare"
                if problem:
                    diags.add_error("Invalid flags", problem, path=["flags"])

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State | None:
        if current is None:
            return planned
        undeclared = [
            k
            for k in current.get("undeclared") or []
            if k[len(planned["path_prefix"]) :] not in (planned.get("values") or {})
        ]
        if planned.get("delete_undeclared") and undeclared:
            planned["undeclared"] = []
            ctx.diagnostics.add_warning(
                f"{ctx.type_name} will delete {len(undeclared)} key(s) Terraform did not declare",
                "delete_undeclared = true: the apply deletes these keys under "
                f"{planned['path_prefix']}:\n  " + "\n  ".join(undeclared),
                path=["delete_undeclared"],
            )
        else:
            planned["undeclared"] = undeclared
        return planned

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        prefix = planned["path_prefix"]
        if not self._write(api, ctx.diagnostics, planned, {}, f"create keys under {prefix}"):
            return None
        # Not deleted at creation, even with delete_undeclared: no plan listed them yet.
        found = self._list(api, ctx.diagnostics, prefix, f"read keys under {prefix}")
        declared = planned.get("values") or {}
        undeclared = (
            [] if found is None else [p.key for p in found if p.key[len(prefix) :] not in declared]
        )
        return {**planned, "id": prefix, "undeclared": undeclared}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        prefix = current["path_prefix"]
        found = self._list(api, ctx.diagnostics, prefix, f"read keys under {prefix}")
        if found is None:
            return current
        return self._state(prefix, found, current)

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        prefix = planned["path_prefix"]
        doing = f"update keys under {prefix}"
        if not self._write(api, ctx.diagnostics, planned, current, doing):
            return current
        declared = planned.get("values") or {}
        dropped = [prefix + rel for rel in current.get("values") or {} if rel not in declared]
        doomed = dropped + (
            list(current.get("undeclared") or []) if planned.get("delete_undeclared") else []
        )
        for path in doomed:
            if path[len(prefix) :] in declared:
                continue
            try:
                api.kv_delete(path)
            except APIError as e:
                api_error(ctx.diagnostics, e, f"delete key {path}", hint=_hint(prefix))
                return current
        if planned.get("undeclared") is Unknown:
            found = self._list(api, ctx.diagnostics, prefix, f"read keys under {prefix}")
            planned["undeclared"] = (
                []
                if found is None
                else [p.key for p in found if p.key[len(prefix) :] not in declared]
            )
        return planned

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        prefix = current["path_prefix"]
        for rel in current.get("values") or {}:
            try:
                api.kv_delete(prefix + rel)
            except APIError as e:
                api_error(ctx.diagnostics, e, f"delete key {prefix + rel}", hint=_hint(prefix))
                return current
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        problem = validation.key_prefix(id)
        if problem:
            ctx.diagnostics.add_error(f"Invalid import ID {id!r}", problem)
            return None
        found = self._list(api, ctx.diagnostics, id, f"import keys under {id}")
        if found is None:
            return None
        if not found:
            ctx.diagnostics.add_error(
                f"Cannot import keys under {id}: there are none",
                "Check the prefix with `trellis kv get -recurse`.",
            )
            return None
        values = {p.key[len(id) :]: _text(p.value) for p in found}
        flags = {p.key[len(id) :]: p.flags for p in found if p.flags}
        return {
            "id": id,
            "path_prefix": id,
            "values": values,
            "flags": flags or None,
            "delete_undeclared": None,
            "undeclared": [],
        }

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _state(prefix: str, found: list[KVPair], current: State) -> State:
        """What the server holds, seen through the declaration in ``current``: declared keys
        with their values (a missing one is left out, so the plan writes it again), flags
        that differ from the declaration, and every other key as undeclared."""
        declared = current.get("values") or {}
        on_server = {p.key[len(prefix) :]: p for p in found}
        values = {rel: _text(on_server[rel].value) for rel in declared if rel in on_server}
        flags = {
            rel: on_server[rel].flags
            for rel in values
            if on_server[rel].flags or rel in (current.get("flags") or {})
        }
        return {
            **current,
            "id": prefix,
            "values": values,
            "flags": flags if flags or current.get("flags") is not None else None,
            "undeclared": [prefix + rel for rel in on_server if rel not in declared],
        }

    @staticmethod
    def _list(api: Client, diags: Diagnostics, prefix: str, doing: str) -> list[KVPair] | None:
        try:
            found: list[KVPair] = api.kv_get(prefix, recurse=True).value
        except APIError as e:
            api_error(diags, e, doing, attribute="path_prefix", hint=_hint(prefix))
            return None
        return found

    @staticmethod
    def _write(api: Client, diags: Diagnostics, planned: State, current: State, doing: str) -> bool:
        """Write every declared key whose value or flags differ from ``current``."""
        prefix = planned["path_prefix"]
        old_values, old_flags = current.get("values") or {}, current.get("flags")
        for rel, value in (planned.get("values") or {}).items():
            flags = _flags_of(planned.get("flags"), rel)
            if (
                rel in old_values
                and old_values[rel] == value
                and _flags_of(old_flags, rel) == flags
            ):
                continue
            try:
                api.kv_put(prefix + rel, value, flags=flags)
            except APIError as e:
                api_error(
                    diags,
                    e,
                    f"{doing}: write {prefix + rel}",
                    attribute="values",
                    fields={"key": "values", "Value": "values"},
                    hint=_hint(prefix),
                )
                return False
        return True
