"""``data "trellis_intention_check"``: may ``source`` connect to ``destination``, and why?

The answer is computed the way a sidecar computes it: the intentions that apply to the
destination (``/v1/connect/intentions/match``) and the server's default decision, decided by
the shared pure :mod:`trellis.proxy.authz` code, so it names the deciding intention (or says
that the default policy decided), which ``/v1/connect/intentions/check`` does not.
"""

from __future__ import annotations

from tf import schema, types
from tf.iface import Config, DataSource, ReadDataContext, State
from tf.utils import Diagnostics

from trellis.proxy import authz
from trellis.proxy.client import APIError
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check
from trellis.terraform.provider import TrellisProvider


class IntentionCheck(DataSource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "intention_check"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        out = {"computed": True}
        return schema.Schema(
            description="Whether `source` may connect to `destination`, and which intention "
            "decides it.",
            attributes=[
                schema.Attribute("source", types.String(), required=True),
                schema.Attribute("destination", types.String(), required=True),
                schema.Attribute("allowed", types.Bool(), **out, description="True when allowed."),
                schema.Attribute(
                    "default",
                    types.Bool(),
                    **out,
                    description="True when no intention matched and the default policy decided.",
                ),
                schema.Attribute(
                    "intention_id",
                    types.String(),
                    **out,
                    description="The deciding intention's UUID (empty when the default decided).",
                ),
                schema.Attribute(
                    "intention",
                    types.String(),
                    **out,
                    description="The deciding intention, as `web => db (deny)` (or empty).",
                ),
                schema.Attribute(
                    "reason", types.String(), **out, description="The decision, in words."
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "source", validation.service_name)
        check(diags, config, "destination", validation.service_name)

    def read(self, ctx: ReadDataContext, config: Config) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        src, dst = config["source"], config["destination"]
        try:
            matched, default_allow = api.intention_match_with_default("destination", dst).value
        except APIError as e:
            api_error(
                ctx.diagnostics,
                e,
                f"check intentions from {src} to {dst}",
                hint=f'service "{dst}" {{ intentions = "read" }}',
            )
            return None
        intentions = authz.IntentionSet(
            authz.Intention(
                source=i["SourceName"],
                destination=i["DestinationName"],
                action=i["Action"],
                id=i.get("ID", ""),
            )
            for i in matched.get(dst) or []
        )
        decision = intentions.decide(src, dst, default_allow=default_allow)
        deciding = decision.intention
        return {
            **config,
            "allowed": decision.allowed,
            "default": decision.default,
            "intention_id": deciding.id if deciding else "",
            "intention": deciding.label() if deciding else "",
            "reason": decision.reason,
        }
