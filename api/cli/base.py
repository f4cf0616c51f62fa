"""The CLI's small framework: Consul-style flags over argparse, commands, output helpers.

Flags are written as Go's ``flag`` package reads them: one dash (``-http-addr``), a value either
separate or after ``=`` (``-flags 3``, ``-flags=3``), booleans bare or as ``-cas=true``. Two
dashes are accepted too. Unlike Go, a flag may also follow the positional arguments
(``trellis kv get foo -recurse``); there, a dash-word that is not one of the command's flags is
taken as an argument (``trellis kv put key -1``), and ``--`` ends the flags explicitly.

:class:`FlagParser` does this by rewriting the arguments into a form argparse cannot misread
(every flag as ``--name[=value]``, then ``--``, then the positionals) before argparse parses them.
It never exits the process: ``-h`` raises :class:`HelpRequested` and every parse error raises
:class:`UsageError`, which ``main`` renders with the command's usage text.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from trellis.proxy.client import Client

_NEGATIVE_NUMBER = re.compile(r"^-\d+(\.\d+)?$")
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


class UsageError(Exception):
    """The command line is wrong (the user's fault); shown with the command's usage text."""

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage


class HelpRequested(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class CommandError(Exception):
    """The command could not do what was asked; ``message`` is printed as is, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Help(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *a: Any, **kw: Any) -> None:
        raise HelpRequested(parser.format_help())


@dataclass
class _FlagDoc:
    name: str
    metavar: str | None
    help: str
    section: str


class FlagParser(argparse.ArgumentParser):
    """argparse with Go-style single-dash long flags; see the module docstring."""

    def __init__(self, prog: str, usage: str, description: str = "") -> None:
        super().__init__(
            prog=prog,
            add_help=False,
            allow_abbrev=False,
            exit_on_error=False,
        )
        self._usage_line = usage
        self._description = description
        self._takes_value: dict[str, bool] = {}
        self._docs: list[_FlagDoc] = []
        self.add_argument("-h", "--h", "-help", "--help", action=_Help, help=argparse.SUPPRESS)
        self._takes_value.update({"h": False, "help": False})
        self.add_argument("args", nargs="*", help=argparse.SUPPRESS)

    def flag(
        self,
        name: str,
        *,
        help: str,
        section: str = "Command Options",
        metavar: str | None = None,
        aliases: Sequence[str] = (),
        **kw: Any,
    ) -> None:
        """Add ``-name`` (and ``--name``); ``kw`` as for ``add_argument``."""
        names = [name, *aliases]
        kw.setdefault("dest", name.replace("-", "_"))
        opts = [s for n in names for s in (f"-{n}", f"--{n}")]
        action = self.add_argument(*opts, **kw)
        takes = action.nargs != 0
        for n in names:
            self._takes_value[n] = takes
        if takes and metavar is None:
            metavar = "value"
        self._docs.append(_FlagDoc(name, metavar if takes else None, help, section))

    # -- parsing ---------------------------------------------------------------------------

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        opts: list[str] = []
        pos: list[str] = []
        i = 0
        while i < len(argv):
            a = argv[i]
            i += 1
            if a == "--":
                pos.extend(argv[i:])
                break
            if a.startswith("-") and a != "-" and not a.startswith("---"):
                body = a[2:] if a.startswith("--") else a[1:]
                name, eq, val = body.partition("=")
                takes = self._takes_value.get(name)
                if takes is True:
                    if not eq:
                        if i >= len(argv):
                            self.error(f"flag needs an argument: -{name}")
                        val = argv[i]
                        i += 1
                    opts.append(f"--{name}={val}")
                    continue
                if takes is False:
                    if eq and val not in _TRUE:
                        if val in _FALSE:
                            continue
                        self.error(f'invalid boolean value "{val}" for -{name}')
                    opts.append(f"--{name}")
                    continue
                if not pos and not _NEGATIVE_NUMBER.match(a):
                    self.error(f"flag provided but not defined: -{name}")
            pos.append(a)
        try:
            return self.parse_args([*opts, "--", *pos])
        except argparse.ArgumentError as e:
            name = (e.argument_name or "").split("/")[0]
            self.error(f"invalid value for flag {name}: {e.message}" if name else str(e))
            raise  # unreachable: error() raises

    def error(self, message: str) -> Any:
        raise UsageError(message, self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or f"exit {status}", self.format_help())

    # -- help ------------------------------------------------------------------------------

    def format_help(self) -> str:
        out = [f"Usage: {self._usage_line}", ""]
        if self._description:
            out.append(textwrap.indent(textwrap.dedent(self._description).strip("\n"), "  "))
            out.append("")
        sections: dict[str, list[_FlagDoc]] = {}
        for d in self._docs:
            sections.setdefault(d.section, []).append(d)
        for title, docs in sections.items():
            out.append(f"{title}:")
            out.append("")
            for d in docs:
                out.append(f"  -{d.name}=<{d.metavar}>" if d.metavar else f"  -{d.name}")
                out.append(
                    textwrap.fill(
                        d.help, width=80, initial_indent="     ", subsequent_indent="     "
                    )
                )
                out.append("")
        return "\n".join(out).rstrip("\n") + "\n"


def uint(text: str) -> int:
    """An unsigned integer flag value, as Go's ``Uint64Var`` reads it."""
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0 or v >= 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 2^64-1")
    return v


def duration(text: str) -> float:
    """A duration flag value ("10s", "1m30s", "250ms"), as Go's ``DurationVar`` reads it."""
    from trellis.proxy.durations import DurationError, parse_duration

    try:
        return parse_duration(text)
    except DurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def integer(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


# -- commands ----------------------------------------------------------------------------------


@dataclass
class Context:
    """What a command may use: the streams and the values ``main`` read from the environment."""

    stdin: IO[str]
    stdout: IO[str]
    stderr: IO[str]
    http_addr: str
    token: str | None

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def err(self, text: str) -> None:
        self.stderr.write(text + "\n")

    def out_bytes(self, data: bytes) -> None:
        """Write bytes as they are (a K/V value need not be text), then a newline."""
        buf = getattr(self.stdout, "buffer", None)
        if buf is not None:
            self.stdout.flush()
            buf.write(data + b"\n")
            buf.flush()
        else:
            self.out(data.decode("utf-8", errors="replace"))

    def read_stdin(self) -> bytes:
        buf = getattr(self.stdin, "buffer", None)
        if buf is not None:
            return bytes(buf.read())
        return self.stdin.read().encode("utf-8")

    def client(self, ns: argparse.Namespace, *, timeout: float | None = None) -> Client:
        """The API client for this command: flags beat the environment. ``timeout``: for a
        command whose request may take long (a snapshot of a large store)."""
        address = getattr(ns, "http_addr", None) or self.http_addr
        token = getattr(ns, "token", None)
        token_file = getattr(ns, "token_file", None)
        if not token and token_file:
            try:
                with open(token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise CommandError(
                    f"Error! Cannot read token file {token_file}: {e.strerror}"
                ) from None
        if timeout is not None:
            return Client(address, token=token or self.token, timeout=timeout)
        return Client(address, token=token or self.token)

    def print_json(self, value: Any) -> None:
        self.out(json.dumps(value, indent=2, sort_keys=False))


def add_http_flags(p: FlagParser) -> None:
    p.flag(
        "http-addr",
        metavar="address",
        section="HTTP API Options",
        help="The address and port of the Trellis HTTP API, e.g. http://127.0.0.1:8500. "
        "Can also be given with the TRELLIS_HTTP_ADDR environment variable.",
    )
    p.flag(
        "token",
        section="HTTP API Options",
        help="ACL token to use in the request. Can also be given with the "
        "TRELLIS_HTTP_TOKEN environment variable.",
    )
    p.flag(
        "token-file",
        metavar="path",
        section="HTTP API Options",
        help="File holding the ACL token to use in the request (used when -token is not given).",
    )


def add_format_flag(p: FlagParser) -> None:
    p.flag(
        "format",
        choices=("pretty", "json"),
        default="pretty",
        metavar="pretty|json",
        help='Output format: "pretty" for people (the default) or "json" for scripts.',
    )


@dataclass(frozen=True)
class Command:
    """One leaf command, such as ``kv put``."""

    path: tuple[str, ...]
    synopsis: str
    usage: str
    run: Callable[[Context, argparse.Namespace], int]
    flags: Callable[[FlagParser], None] = lambda p: None
    description: str = ""
    http: bool = True

    def parser(self) -> FlagParser:
        p = FlagParser(" ".join(("trellis", *self.path)), self.usage, self.description)
        self.flags(p)
        if self.http:
            add_http_flags(p)
        return p


@dataclass
class Registry:
    """Commands by path, and the synopses of command groups (``kv``, ``catalog``)."""

    commands: dict[tuple[str, ...], Command] = field(default_factory=dict)
    groups: dict[tuple[str, ...], str] = field(default_factory=dict)

    def add(self, *commands: Command) -> None:
        for c in commands:
            self.commands[c.path] = c

    def group(self, path: tuple[str, ...], synopsis: str) -> None:
        self.groups[path] = synopsis

    def children(self, path: tuple[str, ...]) -> dict[str, str]:
        """The names directly under ``path`` with their synopses."""
        out: dict[str, str] = {}
        n = len(path)
        for p, c in self.commands.items():
            if len(p) == n + 1 and p[:n] == path:
                out[p[n]] = c.synopsis
        for p, s in self.groups.items():
            if len(p) == n + 1 and p[:n] == path:
                out[p[n]] = s
        return dict(sorted(out.items()))


def group_help(registry: Registry, path: tuple[str, ...]) -> str:
    name = " ".join(("trellis", *path))
    if path:
        head = f"Usage: {name} <subcommand> [options] [args]\n\n  {registry.groups.get(path, '')}"
        title = "Subcommands:"
    else:
        head = "Usage: trellis [--version] [--help] <command> [<args>]"
        title = "Available commands are:"
    kids = registry.children(path)
    width = max((len(k) for k in kids), default=0)
    lines = [head, "", title]
    lines += [f"    {k.ljust(width)}    {s}" for k, s in kids.items()]
    return "\n".join(lines) + "\n"


# -- output helpers ----------------------------------------------------------------------------


def columnize(rows: Sequence[Sequence[str]], glue: str = "  ") -> str:
    """Align rows in columns, as Consul's ``columnize`` does (no padding after the last)."""
    widths: list[int] = []
    for row in rows:
        for i, cell in enumerate(row):
            if i == len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append(glue.join(cells).rstrip())
    return "\n".join(lines)


def tabulate(rows: Sequence[Sequence[str]], padding: int = 6) -> str:
    """Align rows as Go's ``tabwriter.NewWriter(w, 0, 2, padding, ' ', 0)`` does."""
    widths: list[int] = []
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            if i == len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(cell) + padding)
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def exactly(args: Sequence[str], n: int, what: str) -> None:
    if len(args) < n:
        raise UsageError(f"Error! Missing {what} argument")
    if len(args) > n:
        raise UsageError(f"Too many arguments (expected {n}, got {len(args)})")


def at_most(args: Sequence[str], n: int) -> None:
    if len(args) > n:
        raise UsageError(f"Too many arguments (expected {n}, got {len(args)})")
