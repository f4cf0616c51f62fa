"""``data "trellis_services"``: every service in the catalog and its tags
(``/v1/catalog/services``; the services the provider's token may read)."""

from __future__ import annotations

from tf import schema, types
from tf.iface import Config, DataSource, ReadDataContext, State

from trellis.proxy.client import APIError
from trellis.terraform.diagnostics import api_error
from trellis.terraform.provider import TrellisProvider


class ServicesData(DataSource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "services"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            description="Every service in the catalog, with its tags.",
            attributes=[
                schema.Attribute(
                    "names", types.List(types.String()), computed=True, description="Sorted."
                ),
                schema.Attribute(
                    "tags",
                    types.Map(types.List(types.String())),
                    computed=True,
                    description="Each service's tags (across its instances), sorted.",
                ),
            ],
        )

    def read(self, ctx: ReadDataContext, config: Config) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        try:
            found = api.catalog_services().value
        except APIError as e:
            api_error(
                ctx.diagnostics,
                e,
                "list the services",
                hint='service_prefix "" { policy = "read" }',
            )
            return None
        return {
            **config,
            "names": sorted(found),
            "tags": {name: sorted(set(tags or [])) for name, tags in found.items()},
        }
