"""``data "trellis_service"``: the healthy instances of a service (every check passing), as a
sidecar or a load balancer would use them (``/v1/health/service/NAME?passing``)."""

from __future__ import annotations

from tf import schema, types
from tf.iface import Config, DataSource, ReadDataContext, State
from tf.utils import Diagnostics

from trellis.proxy.client import APIError
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check
from trellis.terraform.objects import Object
from trellis.terraform.provider import TrellisProvider

INSTANCE = Object(
    {
        "id": types.String(),
        "node": types.String(),
        "address": types.String(),
        "port": types.Number(),
        "tags": types.List(types.String()),
        "meta": types.Map(types.String()),
    }
)


class ServiceData(DataSource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "service"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            description="The healthy instances of a service (every check passing).",
            attributes=[
                schema.Attribute("name", types.String(), required=True),
                schema.Attribute(
                    "tag", types.String(), optional=True, description="Only instances with it."
                ),
                schema.Attribute(
                    "instances",
                    types.List(INSTANCE),
                    computed=True,
                    description="id, node, address (the node's when the service has none), "
                    "port, tags, meta; sorted by node and id.",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "name", validation.catalog_name)

    def read(self, ctx: ReadDataContext, config: Config) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        name = config["name"]
        try:
            found = api.health_service(name, passing=True, tag=config.get("tag") or None).value
        except APIError as e:
            hint = (
                f'service "{name}" {{ policy = "read" }} and node_prefix "" {{ policy = "read" }}'
            )
            api_error(ctx.diagnostics, e, f"read the instances of service {name}", hint=hint)
            return None
        instances = []
        for entry in found:
            svc, node = entry.get("Service") or {}, entry.get("Node") or {}
            instances.append(
                {
                    "id": svc.get("ID", ""),
                    "node": node.get("Node", ""),
                    "address": svc.get("Address") or node.get("Address", ""),
                    "port": svc.get("Port", 0),
                    "tags": list(svc.get("Tags") or []),
                    "meta": dict(svc.get("Meta") or {}),
                }
            )
        instances.sort(key=lambda i: (i["node"], i["id"]))
        return {**config, "instances": instances}
