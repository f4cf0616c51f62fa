# Run with team db's token (TRELLIS_HTTP_TOKEN; the platform's team_db_token output).

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
  description = "The node the services run on."
  type        = string
}

module "mesh" {
  source = "../../.."

  node = var.node
  # The default deny is the platform's (it needs write on every service's intentions).
  default_deny   = false
  intention_meta = { managed_by = "terraform", team = "db" }

  services = {
    db = {
      port            = 5432
      tags            = []
      meta            = { team = "db" }
      upstreams       = {}
      allowed_callers = ["web"]
    }
  }
}

output "services" {
  value = module.mesh.services
}

output "intentions" {
  value = module.mesh.intentions
}
