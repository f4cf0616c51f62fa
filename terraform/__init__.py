"""The Terraform provider for Trellis (``terraform-provider-trellis``), on the ``tf`` framework.

Theory of operation
-------------------

Terraform starts the provider as a plugin (plugin protocol 6 over gRPC, which ``tf`` serves)
several times per command: once to read the schemas, once to validate, once per plan and apply
step. Each process is short-lived and stateless; everything it knows comes from the
configuration Terraform sends it and from the Trellis HTTP API.

* :mod:`.provider` holds the provider: its settings (``address``, ``token``, ``ca_file``,
  ``insecure_skip_verify``, ``datacenter``, each falling back to the ``TRELLIS_*`` environment,
  which only ``main`` reads) and the one :class:`trellis.proxy.client.Client` every resource
  calls. Resources never open connections of their own: all API calls go through that client,
  the same typed client the ``trellis`` CLI uses.
* :mod:`.resources` holds one module per resource and :mod:`.data_sources` one per data
  source. Each is thin CRUD: it turns Terraform state into client calls and API answers back
  into state. A read that finds nothing returns None, which Terraform shows as "deleted" and
  plans to create again (drift); a read returns exactly what the server holds, normalized so
  that equal values compare equal (an empty description and no description, for example), so a
  plan shows a change only when there is one.
* :mod:`.diagnostics` is the one place that turns a client error (``APIError``,
  ``ConnectionFailed``) into a Terraform diagnostic that says what to fix; :mod:`.validation`
  holds the checks Terraform runs at plan time, before any API call.
* :mod:`.mirror` writes the filesystem mirror that ``trellis terraform mirror DIR`` installs
  the provider from (see terraform/README.md for the source address and why).

Nothing here prints to stdout: Terraform reads the plugin handshake from it.
"""
