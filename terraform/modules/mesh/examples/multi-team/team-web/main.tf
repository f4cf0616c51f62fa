# Run with team web's token (TRELLIS_HTTP_TOKEN; the platform's team_web_token output).

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
  intention_meta = { managed_by = "terraform", team = "web" }

  services = {
    web = {
      port            = 8080
      tags            = []
      meta            = { team = "web" }
      upstreams       = { db = 9191 }
      allowed_callers = []
    }
  }
}

output "services" {
  value = module.mesh.services
}

output "intentions" {
  value = module.mesh.intentions
}
