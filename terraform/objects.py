"""``Object``: the Terraform object type, which the ``tf`` framework does not have.

A data source's computed results (a service's instances) are lists of objects; the framework
offers only String/Number/Bool/List/Set/Map. An object is a Python dict with exactly the
declared attributes, sent to Terraform as a msgpack map, and its type is described to
Terraform in cty's JSON form (``["object",{"name":"string",...}]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tf.types import TfType, Unknown


class Object:
    def __init__(self, attributes: Mapping[str, TfType]) -> None:
        self.attributes = dict(attributes)

    def encode(self, value: Any) -> Any:
        if value is None or value is Unknown:
            return value
        return {k: t.encode(value.get(k)) for k, t in self.attributes.items()}

    def decode(self, value: Any) -> Any:
        if value is None or value is Unknown:
            return value
        return {k: t.decode(value.get(k)) for k, t in self.attributes.items()}

    def semantically_equal(self, a_decoded: Any, b_decoded: Any) -> bool:
        return bool(a_decoded == b_decoded)

    def tf_type(self) -> bytes:
        fields = {k: json.loads(t.tf_type()) for k, t in self.attributes.items()}
        return json.dumps(["object", fields], separators=(",", ":")).encode()
