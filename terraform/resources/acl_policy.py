"""``trellis_acl_policy``: an ACL policy (name, description, rules, datacenters).

Rules are compared by meaning, not by text. Both sides are parsed with the server's own
parser (:func:`trellis.api.acl.rules.parse_rules`, which turns HCL and JSON into one canonical
form), so:

* a read that finds rules written differently but meaning the same (reformatted, reordered,
  HCL turned into JSON, outside Terraform) keeps the state's text: no difference;
* a configuration whose rules were reformatted plans no change: ``plan`` hands back the prior
  text, which Terraform accepts as "equivalent to the configuration" (a provider may return
  the prior value of an attribute in place of the configured one);
* rules that mean something else show as a change, with both texts.

Rules are also parsed at plan time, so a syntax error or an unknown rule stops the plan on the
``rules`` line with the server's message. Import ID: the policy's ID, or its name.
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
    PlanContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.utils import Diagnostics

from trellis.api.acl.rules import RulesError, parse_rules
from trellis.proxy.client import APIError
from trellis.terraform import validation
from trellis.terraform.diagnostics import api_error
from trellis.terraform.fields import check, same_or
from trellis.terraform.provider import TrellisProvider

FIELDS = {
    "Name": "name",
    "Description": "description",
    "Rules": "rules",
    "Datacenters": "datacenters",
}
HINT = 'acl = "write"'
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def same_rules(a: Any, b: Any) -> bool:
    """Whether two rules texts mean the same (False when either does not parse)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return parse_rules(a) == parse_rules(b)
    except RulesError:
        return False


class ACLPolicyResource(Resource):
    def __init__(self, provider: TrellisProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "acl_policy"

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(
            version=1,
            description="An ACL policy. Import ID: its ID or its name.",
            attributes=[
                schema.Attribute("id", types.String(), computed=True, description="The ID."),
                schema.Attribute(
                    "name",
                    types.String(),
                    required=True,
                    description="1-128 letters, digits, `-` or `_`.",
                ),
                schema.Attribute("description", types.String(), optional=True),
                schema.Attribute(
                    "rules",
                    types.String(),
                    required=True,
                    description="Rules in HCL or JSON, compared by meaning (formatting and "
                    "order do not count).",
                ),
                schema.Attribute(
                    "datacenters",
                    types.Set(types.String()),
                    optional=True,
                    description="The datacenters it applies in (default: all).",
                ),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check(diags, config, "name", validation.policy_name)
        rules = config.get("rules")
        if validation.known(rules):
            try:
                parse_rules(rules)
            except RulesError as e:
                diags.add_error("Invalid rules", str(e), path=["rules"])

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State | None:
        if current is not None and same_rules(current.get("rules"), planned.get("rules")):
            planned["rules"] = current["rules"]
        return planned

    # -- CRUD -----------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        name = planned["name"]
        try:
            made = api.acl_policy_create(
                name,
                rules=planned["rules"],
                description=planned.get("description") or "",
                datacenters=sorted(planned.get("datacenters") or ()),
            )
        except APIError as e:
            self._error(
                ctx.diagnostics,
                e,
                f"create ACL policy {name}",
                conflict=f"A policy named {name} exists already. Import it (terraform import "
                f"{ctx.type_name}.NAME {name}) or choose another name.",
            )
            return None
        return {**planned, "id": made["ID"]}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            found = api.acl_policy_read(current["id"])
        except APIError as e:
            if e.status == 404:
                return None
            self._error(ctx.diagnostics, e, f"read ACL policy {current.get('name')}")
            return current
        return self._state(found, current)

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        name = planned["name"]
        try:
            api.acl_policy_update(
                current["id"],
                name,
                rules=planned["rules"],
                description=planned.get("description") or "",
                datacenters=sorted(planned.get("datacenters") or ()),
            )
        except APIError as e:
            self._error(
                ctx.diagnostics,
                e,
                f"update ACL policy {name}",
                conflict=f"Another policy is named {name} already; choose another name.",
            )
            return current
        return {**planned, "id": current["id"]}

    def delete(self, ctx: DeleteContext, current: State) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return current
        try:
            api.acl_policy_delete(current["id"])
        except APIError as e:
            if e.status != 404:  # gone already: nothing to do
                self._error(ctx.diagnostics, e, f"delete ACL policy {current.get('name')}")
                return current
        return None

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        api = self.provider.api(ctx.diagnostics)
        if api is None:
            return None
        if not _UUID.match(id):
            problem = validation.policy_name(id)
            if problem:
                ctx.diagnostics.add_error(f"Invalid import ID {id!r}", f"{problem} (or an ID)")
                return None
        try:
            found = api.acl_policy_read(id) if _UUID.match(id) else api.acl_policy_read_by_name(id)
        except APIError as e:
            if e.status == 404:
                ctx.diagnostics.add_error(
                    f"Cannot import ACL policy {id}: there is none",
                    "Check the name or ID with `trellis acl policy list`.",
                )
            else:
                self._error(ctx.diagnostics, e, f"import ACL policy {id}")
            return None
        return self._state(found, None)

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _state(found: dict[str, Any], current: State | None) -> State:
        current = current or {}
        rules = found.get("Rules") or ""
        if same_rules(current.get("rules"), rules):
            rules = current["rules"]
        return {
            "id": found["ID"],
            "name": found.get("Name", ""),
            "description": same_or(current.get("description"), found.get("Description") or "", ""),
            "rules": rules,
            "datacenters": same_or(
                current.get("datacenters"), sorted(found.get("Datacenters") or []), []
            ),
        }

    @staticmethod
    def _error(diags: Diagnostics, e: APIError, doing: str, *, conflict: str = "") -> None:
        api_error(diags, e, doing, attribute="rules", fields=FIELDS, hint=HINT, conflict=conflict)
