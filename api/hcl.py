"""HCL documents (service definitions, server configs, later ACL rules) as plain JSON values.

python-hcl2 8 keeps the quotes of strings and marks blocks with ``__is_block__`` unless told
otherwise; this module asks for plain strings, then turns a block that appears once into an
object, as Consul's HCL decoder does, except under keys that may repeat.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Keys whose blocks stay a list even when there is one (several services in one file).
REPEATABLE = frozenset({"service", "services", "checks", "upstreams", "paths", "expose_paths"})


def loads(text: str, *, repeatable: Iterable[str] = REPEATABLE) -> Any:
    """Parse HCL text; raises whatever python-hcl2 raises on a syntax error."""
    import hcl2

    opts = hcl2.SerializationOptions(
        with_comments=False,
        strip_string_quotes=True,
        explicit_blocks=True,
        preserve_heredocs=False,
    )
    return _unwrap(hcl2.loads(text, serialization_options=opts), None, frozenset(repeatable))


def _unwrap(v: Any, key: str | None, repeatable: frozenset[str]) -> Any:
    if isinstance(v, dict):
        return {k: _unwrap(x, k, repeatable) for k, x in v.items() if k != "__is_block__"}
    if isinstance(v, list):
        items = [_unwrap(x, None, repeatable) for x in v]
        blocks = bool(v) and all(isinstance(x, dict) and x.get("__is_block__") for x in v)
        if blocks and len(items) == 1 and key not in repeatable:
            return items[0]
        return items
    return v
