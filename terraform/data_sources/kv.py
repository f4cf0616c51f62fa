"""``data "trellis_key"`` (one key) and ``data "trellis_keys"`` (every key under a prefix)."""

from __future__ import annotations

from tf import schema, types
from tf.iface import Config, DataSource, ReadDataContext, State
from tf.utils import Diagnostics

from trellis.proxy.client import APIError
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check
from trellis.terraform.provider import TrellisProvider


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", errors="replace")


class KeyData(DataSource):
    """One key's value and flags; ``exists`` false (and ``value`` the ``default``) when there
    is none, so a configuration can read a key that may not be there yet."""

    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "key"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            description="One K/V key.",
            attributes=[
                schema.Attribute("path", types.String(), required=True),
                schema.Attribute(
                    "default",
                    types.String(),
                    optional=True,
                    description="The value when the key does not exist (else: an error).",
                ),
                schema.Attribute("value", types.String(), computed=True),
                schema.Attribute("flags", types.Number(), computed=True),
                schema.Attribute("exists", types.Bool(), computed=True),
                schema.Attribute("modify_index", types.Number(), computed=True),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "path", validation.key_path)

    def read(self, ctx: ReadDataContext, config: Config) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        path = config["path"]
        try:
            pair = api.kv_get(path).value
        except APIError as e:
            api_error(
                ctx.diagnostics, e, f"read key {path}", hint=f'key "{path}" {{ policy = "read" }}'
            )
            return None
        if pair is None:
            if config.get("default") is None:
                ctx.diagnostics.add_error(
                    f"Key {path} does not exist",
                    "Set default to read a key that may be missing.",
                    path=["path"],
                )
                return None
            return {**config, "value": config["default"], "flags": 0, "exists": False,
                    "modify_index": 0}  # fmt: skip
        return {
            **config,
            "value": _text(pair.value),
            "flags": pair.flags,
            "exists": True,
            "modify_index": pair.modify_index,
        }


class KeysData(DataSource):
    """Every key under a prefix: ``values`` and ``flags`` by path under the prefix."""

    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "keys"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            description="Every K/V key under a prefix.",
            attributes=[
                schema.Attribute(
                    "path_prefix", types.String(), required=True, description="Ends in `/`."
                ),
                schema.Attribute(
                    "values",
                    types.Map(types.String()),
                    computed=True,
                    description="Key path under the prefix -> value.",
                ),
                schema.Attribute(
                    "flags",
                    types.Map(types.Number()),
                    computed=True,
                    description="Key path under the prefix -> flags.",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "path_prefix", validation.key_prefix)

    def read(self, ctx: ReadDataContext, config: Config) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        prefix = config["path_prefix"]
        try:
            pairs = api.kv_get(prefix, recurse=True).value
        except APIError as e:
            api_error(
                ctx.diagnostics,
                e,
                f"read keys under {prefix}",
                hint=f'key_prefix "{prefix}" {{ policy = "read" }}',
            )
            return None
        n = len(prefix)
        return {
            **config,
            "values": {p.key[n:]: _text(p.value) for p in pairs},
            "flags": {p.key[n:]: p.flags for p in pairs},
        }
