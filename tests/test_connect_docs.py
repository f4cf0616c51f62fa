"""The native SDK's API docs keep up with its code: every public name of ``trellis.connect``
(its ``__all__``) and every public method of ``Service`` has a docstring and a section of
docs/connect.md, and each section names every parameter its signature has."""

from __future__ import annotations

import inspect
import re
from enum import Enum
from pathlib import Path

import pytest

import trellis.connect
from trellis.connect import Service

DOCS = Path(__file__).resolve().parent.parent / "docs" / "connect.md"


def _sections() -> dict[str, str]:
    """docs/connect.md's sections by the name in their heading: ``## `Service``` is
    ``Service``, ``### `Service.connect(name, ...)``` is ``Service.connect``."""
    out: dict[str, str] = {}
    parts = re.split(r"^#{2,3} `([\w.]+)([^\n]*)\n", DOCS.read_text(), flags=re.M)
    for name, heading, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        assert name not in out, f"two sections for {name}"
        out[name] = heading + "\n" + body  # the heading may hold the signature
    return out


def _methods() -> list[str]:
    return [
        name
        for name, member in vars(Service).items()
        if not name.startswith("_") and callable(member)
    ]


PUBLIC = [*trellis.connect.__all__, *(f"Service.{m}" for m in _methods())]


def _resolve(dotted: str) -> object:
    obj: object = trellis.connect
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_the_methods_found_are_the_api():
    # What _methods() reads, so that a rename cannot empty the list the tests below walk.
    assert {"ready", "close", "server_ssl_context", "authorize", "connect"} <= set(_methods())


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_name_has_a_docstring_and_a_section_naming_its_parameters(name):
    obj = _resolve(name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 40, f"{name} has no real docstring"
    sections = _sections()
    assert name in sections, f"docs/connect.md has no section for {name}"
    # An exception's or an enum's call signature is the base class's: nothing to document.
    if callable(obj) and not (isinstance(obj, type) and issubclass(obj, BaseException | Enum)):
        for p in inspect.signature(obj).parameters:
            if p not in ("self", "cls") and not p.startswith("_"):
                assert re.search(rf"\b{p}\b", sections[name]), f"{name}: {p} not documented"


def test_the_docs_document_nothing_that_is_not_there():
    # A section for a name the package no longer has is a stale doc.
    extra = sorted(set(_sections()) - set(PUBLIC))
    assert extra == []
