"""The three Python Consul clients of the compatibility suite, side by side in one process.

py-consul, python-consul and python-consul2 all ship one top-level package, ``consul``, so
they cannot be installed into one environment (each would overwrite the others' files).
py-consul is installed as usual (the test extras); the Makefile installs the other two each
into a directory of its own under ``build/consul-clients/`` (``pip install --target``). This
module imports each one from its directory under a private copy of ``sys.modules``: the
package's modules are imported with ``consul`` pointing at that client's files, kept, and
``sys.modules`` is put back as it was, so ``import consul`` elsewhere still means py-consul.
The clients import everything they use at module level, so the kept modules keep working.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIRS = ROOT / "build" / "consul-clients"
#: The client distributions and where each one's ``consul`` package comes from (None: the
#: environment's own, py-consul).
CLIENTS: dict[str, Path | None] = {
    "py-consul": None,
    "python-consul": CLIENT_DIRS / "python-consul",
    "python-consul2": CLIENT_DIRS / "python-consul2",
}
_loaded: dict[str, ModuleType] = {}


def _ours(name: str) -> bool:
    return name == "consul" or name.startswith("consul.")


def load(client: str) -> ModuleType:
    """The ``consul`` package of ``client`` (a key of ``CLIENTS``)."""
    if client in _loaded:
        return _loaded[client]
    where = CLIENTS[client]
    if where is None:
        import consul

        _loaded[client] = consul
        return consul
    if not (where / "consul" / "__init__.py").is_file():
        raise AssertionError(f"{client} is not installed in {where}: run make")
    saved = {k: v for k, v in sys.modules.items() if _ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(where))
    try:
        mod = importlib.import_module("consul")
        importlib.import_module("consul.base")
        importlib.import_module("consul.std")
        assert Path(mod.__file__ or "").parent.parent == where, mod.__file__
    finally:
        sys.path.remove(str(where))
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    _loaded[client] = mod
    return mod
