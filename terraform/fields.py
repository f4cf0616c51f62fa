"""Small helpers the resources share: plan-time checks as diagnostics, and the normalization
that keeps a plan empty when nothing changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tf.utils import Diagnostics


def check(
    diags: Diagnostics, config: dict[str, Any], name: str, rule: Callable[[Any], str | None]
) -> None:
    """Run one :mod:`trellis.terraform.validation` rule on ``config[name]``; a problem becomes
    an error on that attribute (the configuration's author is at fault)."""
    problem = rule(config.get(name))
    if problem:
        diags.add_error(f"Invalid {name}", problem, path=[name])


def same_or(current: Any, read: Any, empty: Any) -> Any:
    """The value to put in state for what the server returned (``read``).

    The API does not tell "not set" from "empty" (no description and ``""``, no meta and
    ``{}``, no flags and ``0``), while Terraform does: state holding ``""`` where the
    configuration says nothing is a difference in every plan. So when the server holds the
    empty value and the state already says "not set" or "empty", the state's spelling is kept;
    any other value read is the server's, which is how a change made outside Terraform shows.
    """
    if read == empty and current in (None, empty):
        return current
    return read
