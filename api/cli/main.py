"""The ``trellis`` command: dispatch to a command, render every failure as a message.

The environment is read here and nowhere below: ``main`` takes ``TRELLIS_HTTP_ADDR`` and
``TRELLIS_HTTP_TOKEN`` and passes them down in a :class:`~trellis.api.cli.base.Context`. ``run`` is
``main`` with everything injected (argv, environment, streams), for tests and embedding.

Exit status: 0 on success, 1 on any error (usage, API, connection). A failure is printed to
stderr as one message (``Error! ...``, or Consul's wording for the same case), never as a
traceback.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO

from trellis.api import __version__
from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    HelpRequested,
    Registry,
    UsageError,
    group_help,
)
from trellis.proxy.client import DEFAULT_ADDRESS, APIError


def _version(ctx: Context, ns: object) -> int:
    ctx.out(f"Trellis v{__version__}")
    return 0


#: The modules of trellis.api.cli that register commands, in registration order.
MODULES = (
    "kv",
    "acl",
    "ca",
    "intention",
    "services",
    "catalog",
    "serve",
    "connect",
    "agent",
    "terraform",
    "lock",
    "snapshot",
    "events",
)
#: Which of them registers the commands under each first word. ``run`` imports only the module
#: that the command line names: ``trellis connect proxy`` is a long-lived process beside every
#: service, and must not carry the other commands' imports (the server's settings among them).
#: Help and unknown words load every module. tests/test_cli.py checks this table against what
#: the modules register.
FIRST_WORDS = {
    "acl": "acl",
    "agent": "agent",
    "ca": "ca",
    "catalog": "catalog",
    "connect": "connect",
    "dev": "serve",
    "info": "catalog",
    "intention": "intention",
    "kv": "kv",
    "leave": "agent",
    "lock": "lock",
    "event": "events",
    "maint": "events",
    "watch": "events",
    "members": "catalog",
    "reload": "agent",
    "server": "serve",
    "services": "services",
    "snapshot": "snapshot",
    "terraform": "terraform",
}


@functools.cache
def build_registry(modules: tuple[str, ...] = MODULES) -> Registry:
    r = Registry()
    for name in modules:
        importlib.import_module(f"trellis.api.cli.{name}").register(r)
    r.add(
        Command(
            ("version",),
            "Prints the Trellis version",
            "trellis version",
            _version,
            http=False,
        )
    )
    return r


def registry_for(argv: Sequence[str]) -> Registry:
    """The commands that ``argv`` may name: one module's when its first word is known."""
    module = FIRST_WORDS.get(argv[0]) if argv else None
    return build_registry((module,) if module else MODULES)


def _find(registry: Registry, argv: Sequence[str]) -> tuple[tuple[str, ...], Command | None]:
    """The longest command path that argv starts with: a command, or else a group."""
    path: tuple[str, ...] = ()
    for word in argv:
        nxt = (*path, word)
        if nxt in registry.commands:
            return nxt, registry.commands[nxt]
        if nxt in registry.groups:
            path = nxt
            continue
        break
    return path, None


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: IO[str],
    stdout: IO[str],
    stderr: IO[str],
    registry: Registry | None = None,
) -> int:
    ctx = Context(
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        http_addr=env.get("TRELLIS_HTTP_ADDR") or DEFAULT_ADDRESS,
        token=env.get("TRELLIS_HTTP_TOKEN") or None,
    )
    argv = list(argv)
    if argv and argv[0] in ("-v", "-version", "--version"):
        return _version(ctx, None)
    if registry is None:
        registry = registry_for(argv)
    path, cmd = _find(registry, argv)
    if cmd is None:
        rest = argv[len(path) :]
        text = group_help(registry, path)
        if rest and rest[0] in ("-h", "-help", "--help"):
            ctx.stdout.write(text)
            return 0
        if rest:
            ctx.err(f"Unknown command: {' '.join(argv[: len(path) + 1])}")
            ctx.err("")
        ctx.stderr.write(text)
        return 1
    parser = cmd.parser()
    try:
        ns = parser.parse(argv[len(path) :])
        return cmd.run(ctx, ns)
    except HelpRequested as h:
        ctx.stdout.write(h.text)
        return 0
    except UsageError as e:
        ctx.err(e.message)
        ctx.err("")
        ctx.stderr.write(e.usage or parser.format_help())
        return 1
    except CommandError as e:
        ctx.err(e.message)
        return 1
    except APIError as e:
        ctx.err(f"Error! {e.message}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A bug of ours: still one line, not a traceback, but say that it is unexpected.
        ctx.err(f"Error! Unexpected failure in trellis {' '.join(path)}: {type(e).__name__}: {e}")
        return 1
    finally:
        try:
            ctx.stdout.flush()
        except (OSError, ValueError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """The console script ``trellis``."""
    try:
        return run(
            sys.argv[1:] if argv is None else argv,
            env=os.environ,
            stdin=sys.stdin,
            stdout=sys.stdout,
            stderr=sys.stderr,
        )
    except BrokenPipeError:
        # The reader went away (``trellis kv get -recurse | head``): stop quietly, and keep
        # the interpreter from complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
