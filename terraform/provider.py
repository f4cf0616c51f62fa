"""The provider: its settings, the API client every resource shares, and ``main``.

Settings and their fallbacks (the environment is read once, in :func:`main`, and handed in):

============================  ======================  =========================================
setting                       environment             meaning
============================  ======================  =========================================
``address``                   ``TRELLIS_HTTP_ADDR``   ``http://HOST:PORT`` or ``https://...``;
                                                      default ``http://127.0.0.1:8500``
``token`` (sensitive)         ``TRELLIS_HTTP_TOKEN``  the ACL token sent with every request
``ca_file``                   ``TRELLIS_CACERT``      CA bundle that verifies an HTTPS server
``insecure_skip_verify``                              no TLS verification (a test server only)
``datacenter``                                        the datacenter the server must serve
============================  ======================  =========================================

A setting in the configuration wins over the environment. Trellis does not forward requests
between datacenters, so ``datacenter`` is a guard, not a routing choice: the provider checks,
when it is configured, that the server at ``address`` serves that datacenter, and refuses to
go on otherwise (a configuration meant for another datacenter must not be applied here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tf import schema, types
from tf.iface import Config, DataSource, Provider, Resource
from tf.types import Unknown
from tf.utils import Diagnostics

from trellis.api import __version__
from trellis.proxy.client import DEFAULT_ADDRESS, APIError, Client, ConnectionFailed
from trellis.terraform.diagnostics import api_error
from trellis.terraform.validation import known

if TYPE_CHECKING:
    import httpx

#: The provider's source address is HOSTNAME/NAMESPACE/TYPE (terraform/README.md says why
#: the hostname is under .invalid: no registry can ever answer for it).
HOSTNAME = "trellis.invalid"
NAMESPACE = "trellis"
TYPE = "trellis"
SOURCE = f"{HOSTNAME}/{NAMESPACE}/{TYPE}"
#: The provider is released with Trellis and carries its version.
VERSION = __version__


class TrellisProvider(Provider):
    """The provider Terraform talks to. ``env`` is the environment the fallbacks come from;
    ``transport`` replaces the network with an httpx transport (the real app in process, in
    tests)."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.env = dict(env or {})
        self.transport = transport
        self.client: Client | None = None
        self.datacenter: str | None = None

    # -- what Terraform asks first --------------------------------------------------------------

    def full_name(self) -> str:
        return SOURCE

    def get_model_prefix(self) -> str:
        return "trellis_"

    def get_provider_schema(self, diags: Diagnostics) -> schema.Schema:
        return schema.Schema(
            attributes=[
                schema.Attribute(
                    "address",
                    types.String(),
                    optional=True,
                    description="Trellis HTTP API address (http://HOST:PORT or https://...). "
                    f"Default: TRELLIS_HTTP_ADDR, else {DEFAULT_ADDRESS}.",
                ),
                schema.Attribute(
                    "token",
                    types.String(),
                    optional=True,
                    sensitive=True,
                    description="ACL token for every request. Default: TRELLIS_HTTP_TOKEN.",
                ),
                schema.Attribute(
                    "ca_file",
                    types.String(),
                    optional=True,
                    description="CA bundle (PEM) that verifies an HTTPS address. "
                    "Default: TRELLIS_CACERT, else the system's CAs.",
                ),
                schema.Attribute(
                    "insecure_skip_verify",
                    types.Bool(),
                    optional=True,
                    description="Do not verify the server's TLS certificate (a test server "
                    "only; anyone on the path can then read the token).",
                ),
                schema.Attribute(
                    "datacenter",
                    types.String(),
                    optional=True,
                    description="The datacenter the server must serve; the provider refuses "
                    "to work against another one.",
                ),
            ]
        )

    def get_resources(self) -> list[type[Resource]]:
        from trellis.terraform.resources import RESOURCES

        return list(RESOURCES)

    def get_data_sources(self) -> list[type[DataSource]]:
        from trellis.terraform.data_sources import DATA_SOURCES

        return list(DATA_SOURCES)

    # -- settings -------------------------------------------------------------------------------

    def validate_config(self, diags: Diagnostics, config: Config) -> None:
        ca_file, insecure = config.get("ca_file"), config.get("insecure_skip_verify")
        if known(ca_file) and insecure is True:
            diags.add_error(
                "ca_file and insecure_skip_verify contradict each other",
                "A CA file verifies the server; insecure_skip_verify turns verification off. "
                "Keep ca_file (remove insecure_skip_verify) unless this is a throwaway server.",
                path=["insecure_skip_verify"],
            )

    def settings(self, config: Config) -> dict[str, Any]:
        """The effective settings: the configuration's, else the environment's."""

        def pick(name: str, env_name: str | None) -> Any:
            value = config.get(name)
            if known(value) and value != "":
                return value
            return (self.env.get(env_name) or None) if env_name else None

        return {
            "address": pick("address", "TRELLIS_HTTP_ADDR") or DEFAULT_ADDRESS,
            "token": pick("token", "TRELLIS_HTTP_TOKEN"),
            "ca_file": pick("ca_file", "TRELLIS_CACERT"),
            "insecure_skip_verify": config.get("insecure_skip_verify") is True,
            "datacenter": pick("datacenter", None),
        }

    def configure_provider(self, diags: Diagnostics, config: Config) -> None:
        unknown = sorted(k for k, v in config.items() if v is Unknown)
        if unknown:
            # Falling back to the environment instead would plan against another server.
            for name in unknown:
                diags.add_error(
                    f"The provider's {name} is not known until apply",
                    f"{name} depends on a resource that is not created yet, and the provider "
                    "needs it to plan. Give it a value known at plan time (a variable, or "
                    "apply the resource it depends on first, with -target).",
                    path=[name],
                )
            return
        s = self.settings(config)
        verify: Any = True
        if s["insecure_skip_verify"]:
            verify = False
            diags.add_warning(
                "TLS verification is off",
                "insecure_skip_verify = true: the provider does not check who answers at "
                f"{s['address']}, and sends it the token. Use ca_file instead.",
                path=["insecure_skip_verify"],
            )
        elif s["ca_file"]:
            verify = s["ca_file"]
        try:
            self.client = Client(
                s["address"], token=s["token"], verify=verify, transport=self.transport
            )
        except ConnectionFailed as e:
            diags.add_error("Invalid Trellis address or TLS settings", e.message, path=["address"])
            return
        self.datacenter = s["datacenter"]
        if self.datacenter:
            try:
                served = self.client.datacenter()
            except APIError as e:
                api_error(diags, e, "read the server's datacenter")
                return
            if served != self.datacenter:
                diags.add_error(
                    f"The server serves datacenter {served!r}, not {self.datacenter!r}",
                    f"The provider's address ({s['address']}) is a server of datacenter "
                    f"{served!r}. Trellis does not forward requests between datacenters: "
                    f"point address at a server of {self.datacenter!r}, or fix datacenter.",
                    path=["datacenter"],
                )
                self.client = None

    def api(self, diags: Diagnostics) -> Client | None:
        """The client, or None (and an error) when the provider could not be configured."""
        if self.client is None:
            diags.add_error(
                "The Trellis provider is not configured",
                "An earlier error in the provider block stopped it; fix that one first.",
            )
        return self.client


def main(argv: list[str] | None = None) -> int:
    """The ``terraform-provider-trellis`` executable (Terraform starts it as a plugin)."""
    from tf.runner import run_provider

    if sys.stdout.isatty() and "--dev" not in (argv or sys.argv):
        # Started by a person rather than by Terraform: say what this is instead of printing a
        # plugin handshake and waiting forever.
        print(
            f"terraform-provider-trellis {VERSION}: a Terraform plugin, started by Terraform.\n"
            "Install it with `trellis terraform mirror DIR` (see terraform/README.md).",
            file=sys.stderr,
        )
        return 1
    run_provider(TrellisProvider(os.environ), argv or sys.argv)
    return 0
