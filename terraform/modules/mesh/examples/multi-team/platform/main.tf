# Run with a management token: the teams' policies and tokens, and the default deny.

terraform {
  required_version = ">= 1.0.3"

  required_providers {
    trellis = {
      source  = "trellis.invalid/trellis/trellis"
      version = ">= 0.1.0"
    }
  }
}

provider "trellis" {}

variable "node" {
  description = "The node the teams' services run on (they may read it, not change it)."
  type        = string
}

locals {
  # Each team: the services it owns.
  teams = {
    web = ["web"]
    db  = ["db"]
  }
}

resource "trellis_acl_policy" "team" {
  for_each = local.teams

  name        = "team-${each.key}"
  description = "Team ${each.key}: its services, their sidecars and who may call them."
  rules = join("\n", concat(
    flatten([
      for s in each.value : [
        "service \"${s}\" {\n  policy     = \"write\"\n  intentions = \"write\"\n}",
        "service \"${s}-sidecar-proxy\" {\n  policy = \"write\"\n}",
      ]
    ]),
    ["node \"${var.node}\" {\n  policy = \"read\"\n}"],
  ))
}

resource "trellis_acl_token" "team" {
  for_each = local.teams

  description = "Terraform, team ${each.key}"
  policies    = [trellis_acl_policy.team[each.key].name]
}

resource "trellis_intention" "default_deny" {
  source      = "*"
  destination = "*"
  action      = "deny"
  description = "only what a team allows into its own services gets through"
}

output "team_web_token" {
  value     = trellis_acl_token.team["web"].secret_id
  sensitive = true
}

output "team_db_token" {
  value     = trellis_acl_token.team["db"].secret_id
  sensitive = true
}
