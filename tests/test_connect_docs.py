"""The native SDK's API docs keep up with its code: every public name of ``trellis.connect``
and of its adapter modules ``trellis.connect.wsgi`` and ``trellis.connect.asgi`` (their
``__all__``, the adapters' as ``wsgi.<Name>`` and ``asgi.<Name>``), every public method of
``Service``, ``WorkerService`` and each ``ConnectMiddleware``, has a docstring and a section of
docs/connect.md, and each section names every parameter its signature has. A constant (a
string such as ``wsgi.PEER_ID``) has no docstring of its own: its ``#:`` comment stands for
one."""

from __future__ import annotations

import inspect
import re
from enum import Enum
from pathlib import Path

import pytest

import trellis.connect
import trellis.connect.asgi
import trellis.connect.wsgi
from trellis.connect import Service

DOCS = Path(__file__).resolve().parent.parent / "docs" / "connect.md"


def _sections() -> dict[str, str]:
    """docs/connect.md's sections by the name in their heading: ``## `Service``` is
    ``Service``, ``### `Service.connect(name, ...)``` is ``Service.connect``, and
    ``## `trellis.connect.wsgi``` (a module's) is ``wsgi``."""
    out: dict[str, str] = {}
    parts = re.split(r"^#{2,3} `([\w.]+)([^\n]*)\n", DOCS.read_text(), flags=re.M)
    for name, heading, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        name = name.removeprefix("trellis.connect.")
        assert name not in out, f"two sections for {name}"
        out[name] = heading + "\n" + body  # the heading may hold the signature
    return out


def _methods(cls: type = Service) -> list[str]:
    """``cls``'s public methods. ``__call__`` is one: what a server calls a middleware by, what
    the app calls a ``WorkerService`` by."""
    return [
        name
        for name, member in vars(cls).items()
        if (not name.startswith("_") or name == "__call__") and callable(member)
    ]


def _resolve(dotted: str) -> object:
    obj: object = trellis.connect
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


ADAPTERS = {"wsgi": trellis.connect.wsgi, "asgi": trellis.connect.asgi}
ADAPTER_CLASSES = ("wsgi.WorkerService", "wsgi.ConnectMiddleware", "asgi.ConnectMiddleware")

PUBLIC = [
    *trellis.connect.__all__,
    *(f"Service.{m}" for m in _methods()),
    *ADAPTERS,  # the module's own section: what the adapter is for, its theory
    *(f"{short}.{name}" for short, module in ADAPTERS.items() for name in module.__all__),
    *(f"{c}.{m}" for c in ADAPTER_CLASSES for m in _methods(_resolve(c))),  # type: ignore[arg-type]
]


def _doc(dotted: str) -> str:
    """The docstring of ``dotted``; for a module constant (a string, which has no docstring of
    its own: ``inspect.getdoc`` would give ``str``'s), the ``#:`` comment above its
    assignment in the module's source."""
    obj = _resolve(dotted)
    if callable(obj) or inspect.ismodule(obj):
        return inspect.getdoc(obj) or ""
    module, name = dotted.rsplit(".", 1)
    source = inspect.getsource(_resolve(module))  # type: ignore[arg-type]
    m = re.search(rf"((?:^#:[^\n]*\n)+)^{name} =", source, flags=re.M)
    return " ".join(line.removeprefix("#:").strip() for line in m[1].splitlines()) if m else ""


def test_the_methods_found_are_the_api():
    # What _methods() reads, so that a rename cannot empty the lists the tests below walk.
    assert {"ready", "close", "server_ssl_context", "authorize", "connect"} <= set(_methods())
    assert {"post_fork", "worker_exit", "ssl_context", "start", "__call__"} <= set(
        _methods(trellis.connect.wsgi.WorkerService)
    )
    assert "__call__" in _methods(trellis.connect.wsgi.ConnectMiddleware)
    assert "__call__" in _methods(trellis.connect.asgi.ConnectMiddleware)
    assert {"wsgi.PEER_ID", "wsgi.worker_service", "asgi.peer_chain"} <= set(PUBLIC)


def test_a_constant_s_comment_is_read_as_its_docstring():
    assert _doc("wsgi.PEER_ID").startswith("The environ key holding the allowed peer's SPIFFE ID")
    assert _doc("asgi.NO_EXTENSION").startswith("The refusal of a scope with no TLS extension")


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_name_has_a_docstring_and_a_section_naming_its_parameters(name):
    obj = _resolve(name)
    doc = _doc(name)
    assert len(doc) > 40, f"{name} has no real docstring (or #: comment, for a constant)"
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
