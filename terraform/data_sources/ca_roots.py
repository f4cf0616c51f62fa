"""``data "trellis_ca_roots"``: the CA roots sidecars trust (the active one first)."""

from __future__ import annotations

from tf import schema, types
from tf.iface import Config, DataSource, ReadDataContext, State

from trellis.proxy.client import APIError
from trellis.terraform.diagnostics import api_error
from trellis.terraform.provider import TrellisProvider


class CARoots(DataSource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "ca_roots"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        out = {"computed": True}
        return schema.Schema(
            description="The Connect CA's trusted roots.",
            attributes=[
                schema.Attribute("trust_domain", types.String(), **out),
                schema.Attribute("active_root_id", types.String(), **out),
                schema.Attribute("active_root_cert", types.String(), **out, description="PEM."),
                schema.Attribute(
                    "root_ids", types.List(types.String()), **out, description="Active first."
                ),
                schema.Attribute(
                    "root_certs",
                    types.List(types.String()),
                    **out,
                    description="PEM, in the order of root_ids.",
                ),
                schema.Attribute(
                    "pem_bundle",
                    types.String(),
                    **out,
                    description="Every trusted root as one PEM bundle.",
                ),
            ],
        )

    def read(self, ctx: ReadDataContext, config: Config) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        try:
            got = api.ca_roots().value
        except APIError as e:
            api_error(ctx.diagnostics, e, "read the CA roots")
            return None
        active = got.get("ActiveRootID", "")
        roots = sorted(got.get("Roots") or [], key=lambda r: r.get("ID") != active)
        certs = [str(r.get("RootCert", "")) for r in roots]
        return {
            **config,
            "trust_domain": got.get("TrustDomain", ""),
            "active_root_id": active,
            "active_root_cert": certs[0] if roots and roots[0].get("ID") == active else "",
            "root_ids": [str(r.get("ID", "")) for r in roots],
            "root_certs": certs,
            "pem_bundle": "".join(c if c.endswith("\n") else c + "\n" for c in certs),
        }
