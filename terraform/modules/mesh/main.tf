# The mesh: each service with its sidecar and upstreams, one allow intention per allowed
# caller (a resource per pair, so each can be imported or moved on its own), and optionally a
# default deny.

locals {
  allowed = merge({}, [
    for destination, s in var.services : {
      for source in s.allowed_callers : "${source}/${destination}" => {
        source      = source
        destination = destination
      }
    }
  ]...)
}

resource "trellis_service" "this" {
  for_each = var.services

  name    = each.key
  node    = var.node
  address = var.address
  port    = each.value.port
  tags    = each.value.tags
  meta    = each.value.meta
  sidecar = true

  dynamic "upstream" {
    for_each = each.value.upstreams
    content {
      destination_name = upstream.key
      local_bind_port  = upstream.value
    }
  }
}

resource "trellis_intention" "allow" {
  for_each = local.allowed

  source      = each.value.source
  destination = each.value.destination
  action      = "allow"
  description = "${each.value.source} may call ${each.value.destination}"
  meta        = var.intention_meta
}

resource "trellis_intention" "default_deny" {
  count = var.default_deny ? 1 : 0

  source      = "*"
  destination = "*"
  action      = "deny"
  description = "only the allowed callers get through"
  meta        = var.intention_meta
}
