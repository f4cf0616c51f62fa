output "services" {
  description = "Each service: its catalog ID (NODE/SERVICE_ID, the import ID), port and its sidecar's port."
  value = {
    for name, s in trellis_service.this : name => {
      id           = s.id
      port         = s.port
      sidecar_port = s.sidecar_port
    }
  }
}

output "intentions" {
  description = "The intentions created, by \"SOURCE/DESTINATION\" (the import ID) => UUID; the default deny as \"*/*\"."
  value = merge(
    { for pair, i in trellis_intention.allow : pair => i.id },
    { for i in trellis_intention.default_deny : "*/*" => i.id },
  )
}
