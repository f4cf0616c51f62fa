# Three services: web calls api, api calls db; nothing else is allowed (default deny).

terraform {
  required_version = ">= 1.0.3"

  required_providers {
    trellis = {
      source  = "trellis.invalid/trellis/trellis"
      version = ">= 0.1.0"
    }
  }
}

# address and token from TRELLIS_HTTP_ADDR and TRELLIS_HTTP_TOKEN.
provider "trellis" {}

variable "node" {
  description = "The node to register the services on (`trellis members`, or the agent's node name)."
  type        = string
}

module "mesh" {
  source = "../.."

  node         = var.node
  default_deny = true

  services = {
    web = {
      port            = 8080
      tags            = ["frontend"]
      meta            = { team = "web" }
      upstreams       = { api = 9191 }
      allowed_callers = []
    }
    api = {
      port            = 8081
      tags            = []
      meta            = {}
      upstreams       = { db = 9192 }
      allowed_callers = ["web"]
    }
    db = {
      port            = 5432
      tags            = ["primary"]
      meta            = {}
      upstreams       = {}
      allowed_callers = ["api"]
    }
  }
}

output "services" {
  value = module.mesh.services
}

output "intentions" {
  value = module.mesh.intentions
}
