"""The provider's resources, one module each (``trellis_<name>``).

A new resource is a module here with one :class:`tf.iface.Resource` subclass, added to
``RESOURCES``; it calls the API through ``self.provider.api(diags)`` only, turns every
``APIError`` into a diagnostic with :func:`trellis.terraform.diagnostics.api_error`, and checks
at plan time (``validate``) what :mod:`trellis.terraform.validation` can check.
"""

from trellis.terraform.resources.acl_policy import ACLPolicyResource
from trellis.terraform.resources.acl_token import ACLTokenResource
from trellis.terraform.resources.ca_config import CAConfigResource
from trellis.terraform.resources.intention import IntentionResource
from trellis.terraform.resources.key import KeyResource
from trellis.terraform.resources.keys import KeysResource
from trellis.terraform.resources.service import ServiceResource

RESOURCES = (
    IntentionResource,
    KeyResource,
    KeysResource,
    ServiceResource,
    ACLPolicyResource,
    ACLTokenResource,
    CAConfigResource,
)
