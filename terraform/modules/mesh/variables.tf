variable "node" {
  description = "The catalog node the services run on (created if missing, never changed)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9]([A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$", var.node))
    error_message = "The node must be 1-128 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
  }
}

variable "address" {
  description = "The services' address (their sidecars listen there too)."
  type        = string
  default     = "127.0.0.1"
}

variable "services" {
  description = <<-EOT
    The services, by name. Every attribute must be given (Terraform 1.0 has no optional
    object attributes): [] and {} for none.
      port            - the app's port (its sidecar forwards accepted connections there)
      tags, meta      - catalog tags and metadata
      upstreams       - services it calls: { DESTINATION = LOCAL_BIND_PORT }, the port its
                        sidecar listens on (127.0.0.1) for the app's connections to DESTINATION
      allowed_callers - services allowed to call it (an allow intention each; "*" for any)
  EOT
  type = map(object({
    port            = number
    tags            = list(string)
    meta            = map(string)
    upstreams       = map(number)
    allowed_callers = list(string)
  }))

  validation {
    condition = alltrue([
      for name in keys(var.services) :
      can(regex("^[A-Za-z0-9]([A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$", name))
    ])
    error_message = "A service name must be 1-128 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
  }

  validation {
    condition = alltrue(flatten([
      for s in values(var.services) : concat(
        [s.port >= 1 && s.port <= 65535 && floor(s.port) == s.port],
        [for p in values(s.upstreams) : p >= 1 && p <= 65535 && floor(p) == p],
      )
    ]))
    error_message = "Ports (port and the upstreams' local ports) must be whole numbers from 1 to 65535."
  }

  validation {
    condition = alltrue(flatten([
      for s in values(var.services) : [
        for d in keys(s.upstreams) :
        can(regex("^[A-Za-z0-9]([A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$", d))
      ]
    ]))
    error_message = "An upstream must name a service (1-128 letters, digits, '-', '_' or '.')."
  }

  validation {
    condition = alltrue(flatten([
      for s in values(var.services) : [
        for c in s.allowed_callers :
        c == "*" || can(regex("^[A-Za-z0-9]([A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$", c))
      ]
    ]))
    error_message = "An allowed caller must be a service name or \"*\"."
  }

  validation {
    condition = (
      length(flatten([for s in values(var.services) : values(s.upstreams)])) ==
      length(distinct(flatten([for s in values(var.services) : values(s.upstreams)])))
    )
    error_message = "Two upstreams on the same node cannot share a local port."
  }
}

variable "default_deny" {
  description = "Also create a `*` -> `*` deny intention, so only the allowed callers get through (whatever the server's default policy)."
  type        = bool
  default     = false
}

variable "intention_meta" {
  description = "Metadata put on every intention the module creates."
  type        = map(string)
  default     = { managed_by = "terraform" }
}
