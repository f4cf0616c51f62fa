"""Consul's filter expressions (``?filter=``): parse, check against a shape, evaluate. Pure.

Theory of operation
-------------------
Consul filters the lists that its listing endpoints return with a small boolean language
(``Service.Tags contains "v1" and not (ServiceMeta.env == "qa")``). ``parse(text, shape)``
reads an expression into an AST and checks it against the *shape* of the objects the endpoint
returns (a ``Struct`` of fields, as Consul derives its selectors from its Go structs), so every
error is found before any data is read: a syntax error, a selector the endpoint does not have,
an operator the field's type does not take (``ServicePort contains "8"``), a value the field
cannot hold (``ServicePort == "http"``) and a regular expression that does not compile. Each is
a ``FilterError`` that carries the position (1-based column) where reading stopped; the client
wrote the expression, so the client is at fault (a 400 at the HTTP boundary).

The grammar (whitespace is free except inside strings; ``not``/``and``/``or`` bind in that
order, tightest first)::

    expr     := and ("or" and)*
    and      := unary ("and" unary)*
    unary    := "not" unary | "(" expr ")" | match
    match    := selector ("==" | "!=") value
              | selector ["not"] ("contains" | "matches") value
              | selector "is" ["not"] "empty"
              | value ["not"] "in" selector
    selector := NAME ("." NAME | "[" STRING "]")*      NAME := [A-Za-z][A-Za-z0-9_]*
    value    := STRING | NUMBER | bare selector text   STRING := "..." (Go escapes) | `...` (raw)

Evaluation follows Consul's (go-bexpr's) meaning: ``==`` compares with the value converted to
the field's type; ``in``/``contains`` is a substring test on a string, membership on a list
and a key test on a map; ``is empty`` is a zero length; ``matches`` is an unanchored regular
expression search. A field of the shape that the object lacks (or holds as null) has its
type's zero value, as a Go struct field would (``Kind == ""`` is true for a plain service). A
map key that is absent matches no positive operator, so its negated forms (``!=``, ``not
in``, ``not contains``, ``not matches``, ``is empty``) are true. A selector that goes through a
list of objects (``Checks.Status`` on a health entry) selects that field of every element: a
positive operator is true when any element satisfies it, and a negated one when none does
(``Checks.Status != "critical"``: no check is critical).

Bounds (the expression comes from any client, and runs against every entry of a listing):

* ``MAX_LENGTH`` characters (2048): the parser, the AST and each evaluation are linear in it.
* ``MAX_DEPTH`` nested ``(``/``not`` (32): the parser and the evaluator recurse only there
  (``and``/``or`` chains are loops, not recursion), so Python's recursion limit is never near.
* ``matches`` uses RE2 (google-re2), not Python's backtracking ``re``: RE2 runs in time linear
  in the input for every pattern, so no pattern can cost exponential time (ReDoS) and no
  timeout is needed. It is also the syntax Consul's Go ``regexp`` accepts (no backreferences,
  no lookaround), so an expression that works against Consul works here. The compiled program
  is capped at ``REGEX_MAX_MEM`` bytes; a bigger pattern (``(x{1000}){1000}``) is refused as
  invalid when parsed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

MAX_LENGTH = 2048
MAX_DEPTH = 32
REGEX_MAX_MEM = 1 << 20

T = TypeVar("T")


class FilterError(ValueError):
    """An expression that cannot be used; ``position`` is the 1-based column where it failed."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at position {position})")
        self.message = message
        self.position = position


# -- shapes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A string, an integer or a boolean field."""

    kind: str  # "string" | "int" | "bool"


@dataclasses.dataclass(frozen=True)
class ListOf:
    item: Shape


@dataclasses.dataclass(frozen=True)
class MapOf:
    """A map with string keys (``Meta``, ``TaggedAddresses``)."""

    value: Shape


@dataclasses.dataclass(frozen=True)
class Struct:
    """An object with known fields: selector name -> (JSON key, shape)."""

    fields: Mapping[str, tuple[str, Shape]]


Shape = Scalar | ListOf | MapOf | Struct

STRING = Scalar("string")
INT = Scalar("int")
BOOL = Scalar("bool")


def struct(**fields: Shape | tuple[str, Shape]) -> Struct:
    """A ``Struct`` whose JSON keys are the selector names, unless given as ``(key, shape)``."""
    out: dict[str, tuple[str, Shape]] = {}
    for name, f in fields.items():
        out[name] = f if isinstance(f, tuple) else (name, f)
    return Struct(out)


# -- the AST ---------------------------------------------------------------------------------

#: A step of a resolved selector: ("field", json key, zero value), ("key", map key) or
#: ("each",) to fan out over a list of objects.
Step = tuple[Any, ...]

_MISSING = object()
_ZERO: dict[str, Any] = {"string": "", "int": 0, "bool": False}

# The base operators; each match is one of them, possibly negated.
EQ, CONTAINS, MATCHES, EMPTY = "==", "contains", "matches", "is empty"


@dataclasses.dataclass(frozen=True)
class Match:
    selector: str
    steps: tuple[Step, ...]
    op: str
    negate: bool
    value: Any  # converted to the field's type; a compiled regex for MATCHES; None for EMPTY


@dataclasses.dataclass(frozen=True)
class Not:
    operand: Node


@dataclasses.dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Node = Match | Not | And | Or


@dataclasses.dataclass(frozen=True)
class Filter:
    """A checked expression: call it on an object, or ``select`` a list's matching items."""

    expression: str
    ast: Node

    def __call__(self, obj: Any) -> bool:
        return _eval(self.ast, obj)

    def select(self, items: Iterable[T], key: Callable[[T], Any] | None = None) -> list[T]:
        return [x for x in items if _eval(self.ast, key(x) if key else x)]


def parse(text: str, shape: Struct) -> Filter:
    """Read ``text`` as a filter for objects of ``shape``.

    Raises ``FilterError`` (the client's fault) for anything that is not a valid expression
    for that shape, with the position where it failed.
    """
    if len(text) > MAX_LENGTH:
        raise FilterError(f"the expression is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    p = _Parser(text, shape)
    p.ws()
    if p.at_end():
        raise FilterError("the expression is empty", 1)
    node = p.expr(0)
    p.ws()
    if not p.at_end():
        p.fail("expected 'and', 'or' or the end of the expression")
    return Filter(text, node)


def parse_optional(values: Iterable[str], shape: Struct) -> Filter | None:
    """The filter of a request's ``filter`` parameters: none when all are blank (as in Consul,
    ``?filter=`` is no filter). Several non-blank ones are refused rather than one picked."""
    given = [v for v in values if v.strip()]
    if not given:
        return None
    if len(given) > 1:
        raise FilterError("give one 'filter' parameter, not several", 1)
    return parse(given[0], shape)


# -- the parser --------------------------------------------------------------------------------

_KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "matches", "is", "empty"})
_WS = " \t\r\n"
_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_BOOLS = {
    "1": True,
    "t": True,
    "T": True,
    "true": True,
    "TRUE": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "false": False,
    "FALSE": False,
    "False": False,
}


def _is_name_start(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


class _Parser:
    def __init__(self, text: str, shape: Struct) -> None:
        self.text = text
        self.pos = 0
        self.shape = shape

    # -- scanning

    def fail(self, message: str, at: int | None = None) -> NoReturn:
        raise FilterError(message, (self.pos if at is None else at) + 1)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def ws(self) -> bool:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1
        return self.pos > start

    def peek_word(self) -> str:
        """The bare word at the position (letters, digits, '_'), without consuming it."""
        i = self.pos
        while i < len(self.text) and _is_name_char(self.text[i]):
            i += 1
        return self.text[self.pos : i]

    def keyword(self, word: str) -> bool:
        """Consume ``word`` (after optional whitespace) if it is the next whole word."""
        save = self.pos
        self.ws()
        if self.peek_word() == word:
            self.pos += len(word)
            return True
        self.pos = save
        return False

    def symbol(self, sym: str) -> bool:
        save = self.pos
        self.ws()
        if self.text.startswith(sym, self.pos):
            self.pos += len(sym)
            return True
        self.pos = save
        return False

    # -- expressions

    def expr(self, depth: int) -> Node:
        items = [self.conj(depth)]
        while self.keyword("or"):
            items.append(self.conj(depth))
        return items[0] if len(items) == 1 else Or(tuple(items))

    def conj(self, depth: int) -> Node:
        items = [self.unary(depth)]
        while self.keyword("and"):
            items.append(self.unary(depth))
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary(self, depth: int) -> Node:
        self.ws()
        if depth >= MAX_DEPTH:
            self.fail(f"the expression nests deeper than {MAX_DEPTH} levels")
        if self.peek_word() == "not":
            save = self.pos
            self.pos += 3
            if self.ws() or self.text.startswith("(", self.pos):
                return Not(self.unary(depth + 1))
            if self.at_end():
                self.fail("expected an expression after 'not'")
            self.pos = save
        if self.text.startswith("(", self.pos):
            open_at = self.pos
            self.pos += 1
            node = self.expr(depth + 1)
            if not self.symbol(")"):
                self.ws()
                if self.at_end():
                    self.fail("unmatched '('", open_at)
                self.fail("expected ')', 'and' or 'or'")
            return node
        return self.match()

    def match(self) -> Match:
        start = self.pos
        if self.at_end():
            self.fail("expected a selector or a value")
        c = self.text[self.pos]
        if c in '"`' or c.isdigit() or c == "-":
            value = self.literal()
            return self.membership(value, start)
        if not _is_name_start(c):
            self.fail(f"unexpected {c!r}: expected a selector or a value")
        if self.peek_word() in _KEYWORDS:
            self.fail(f"expected a selector or a value, not {self.peek_word()!r}")
        path = self.selector_path()
        bare = self.text[start : self.pos]
        op_at = self.pos
        if self.symbol("=="):
            return self.compare(path, start, EQ, False)
        if self.symbol("!="):
            return self.compare(path, start, EQ, True)
        if self.keyword("is"):
            negate = self.keyword("not")
            if not self.keyword("empty"):
                self.ws()
                self.fail("expected 'empty' after 'is'" + (" not" if negate else ""))
            word = "is not empty" if negate else "is empty"
            return self.make(path, start, EMPTY, negate, None, op_at, word)
        negate = self.keyword("not")
        for op in (CONTAINS, MATCHES):
            if self.keyword(op):
                return self.compare(path, start, op, negate)
        if self.keyword("in"):
            # The word before "in" was a bare value, not a selector.
            return self.membership_after(bare, start, negate)
        self.ws()
        self.fail(
            "expected an operator (==, !=, in, not in, contains, not contains, matches,"
            " not matches, is empty, is not empty)",
            self.pos if negate or self.pos > op_at else op_at,
        )

    def membership(self, value: str, start: int) -> Match:
        negate = self.keyword("not")
        if not self.keyword("in"):
            self.ws()
            self.fail("expected 'in' or 'not in' after a value")
        return self.membership_after(value, start, negate)

    def membership_after(self, value: str, start: int, negate: bool) -> Match:
        self.ws()
        sel_at = self.pos
        if self.at_end() or not _is_name_start(self.text[self.pos]):
            self.fail("expected a selector after 'in'")
        path = self.selector_path()
        word = "not in" if negate else "in"
        return self.make(path, sel_at, CONTAINS, negate, value, start, word)

    def compare(self, path: list[str], start: int, op: str, negate: bool) -> Match:
        self.ws()
        value_at = self.pos
        if self.at_end():
            self.fail("expected a value")
        c = self.text[self.pos]
        if c in '"`' or c.isdigit() or c == "-":
            value = self.literal()
        elif _is_name_start(c):
            vstart = self.pos
            self.selector_path()  # a bare value: Consul takes its text as written
            value = self.text[vstart : self.pos]
        else:
            self.fail(f"unexpected {c!r}: expected a value")
        word = ("!=" if negate else "==") if op == EQ else ("not " if negate else "") + op
        return self.make(path, start, op, negate, value, value_at, word)

    def selector_path(self) -> list[str]:
        path = [self.name()]
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == ".":
                self.pos += 1
                if self.at_end() or not _is_name_start(self.text[self.pos]):
                    self.fail("expected a name after '.'")
                path.append(self.name())
            elif c == "[":
                self.pos += 1
                self.ws()
                if self.at_end() or self.text[self.pos] not in '"`':
                    self.fail("expected a quoted map key after '['")
                path.append(self.string())
                if not self.symbol("]"):
                    self.ws()
                    self.fail("expected ']'")
            else:
                break
        return path

    def name(self) -> str:
        word = self.peek_word()
        self.pos += len(word)
        return word

    def literal(self) -> str:
        c = self.text[self.pos]
        if c in '"`':
            return self.string()
        start = self.pos
        if c == "-":
            self.pos += 1
        digits = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isascii():
            if not (self.text[self.pos].isdigit() or self.text[self.pos] == "."):
                break
            self.pos += 1
        raw = self.text[start : self.pos]
        body = self.text[digits : self.pos]
        int_part, dot, frac = body.partition(".")
        ok = (
            int_part.isdigit()
            and (int_part == "0" or not int_part.startswith("0"))
            and (not dot or frac.isdigit())
        )
        nxt = self.text[self.pos] if self.pos < len(self.text) else " "
        if not ok or not (nxt in _WS or nxt == ")"):
            self.fail("invalid number", start)
        return raw

    def string(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                self.fail("unterminated string", start)
            c = self.text[self.pos]
            if c == quote:
                self.pos += 1
                return "".join(out)
            if c == "\\" and quote == '"':
                out.append(self.escape())
                continue
            if c == "\n" and quote == '"':
                self.fail("newline in string", self.pos)
            out.append(c)
            self.pos += 1

    def escape(self) -> str:
        at = self.pos
        self.pos += 1
        if self.pos >= len(self.text):
            self.fail("unterminated string", at)
        c = self.text[self.pos]
        self.pos += 1
        if c in _ESCAPES:
            return _ESCAPES[c]
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        if width is not None:
            digits = self.text[self.pos : self.pos + width]
            if len(digits) == width and all(d in "0123456789abcdefABCDEF" for d in digits):
                self.pos += width
                code = int(digits, 16)
                if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
                    return chr(code)
        self.fail(f"invalid escape sequence '\\{c}'", at)

    # -- checking against the shape

    def make(
        self,
        path: list[str],
        sel_at: int,
        op: str,
        negate: bool,
        raw: str | None,
        val_at: int,
        word: str,
    ) -> Match:
        steps, shape = self.resolve(path, sel_at)
        selector = _selector_text(path)
        value: Any = None
        kind = _kind(shape)
        allowed = {
            "string": (EQ, CONTAINS, MATCHES, EMPTY),
            "int": (EQ,),
            "bool": (EQ,),
            "list": (CONTAINS, EMPTY),
            "objects": (EMPTY,),
            "map": (CONTAINS, EMPTY),
            "struct": (),
        }[kind]
        if op not in allowed:
            detail = {
                "string": "a string",
                "int": "a number",
                "bool": "a boolean",
                "list": "a list of values",
                "objects": "a list of objects",
                "map": "a map",
                "struct": "an object: select one of its fields",
            }[kind]
            self.fail(f"operator '{word}' does not apply to {selector}, which is {detail}", sel_at)
        if op == EQ:
            assert raw is not None
            value = self.convert(raw, shape, val_at)
        elif op == CONTAINS:
            assert raw is not None
            item = shape.item if isinstance(shape, ListOf) else STRING
            value = self.convert(raw, item, val_at)
        elif op == MATCHES:
            assert raw is not None
            value = self.regex(raw, val_at)
        return Match(selector, tuple(steps), op, negate, value)

    def resolve(self, path: list[str], at: int) -> tuple[list[Step], Shape]:
        shape: Shape = self.shape
        steps: list[Step] = []
        for i, part in enumerate(path):
            done = _selector_text(path[:i])
            if isinstance(shape, ListOf) and isinstance(shape.item, Struct):
                steps.append(("each",))
                shape = shape.item
            if isinstance(shape, Struct):
                field = shape.fields.get(part)
                if field is None:
                    where = f"{done} has no field" if done else "no field"
                    self.fail(f"unknown selector {_selector_text(path)!r}: {where} {part!r}", at)
                key, shape = field
                steps.append(("field", key, _zero(shape)))
            elif isinstance(shape, MapOf):
                steps.append(("key", part))
                shape = shape.value
            else:
                self.fail(f"unknown selector {_selector_text(path)!r}: {done} has no fields", at)
        return steps, shape

    def convert(self, raw: str, shape: Shape, at: int) -> Any:
        if not isinstance(shape, Scalar):
            self.fail("a value cannot be compared with this selector", at)
        if shape.kind == "int":
            digits = raw[1:] if raw[:1] in "+-" else raw
            if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
                self.fail(f"{raw!r} is not a whole number", at)
            return int(raw)
        if shape.kind == "bool":
            if raw not in _BOOLS:
                self.fail(f"{raw!r} is not true or false", at)
            return _BOOLS[raw]
        return raw

    def regex(self, pattern: str, at: int) -> Any:
        # google-re2 (linear-time matching; see the module docstring), imported on first use:
        # the node agent and the servers load its native library only if a client asks.
        import re2

        options = re2.Options()
        options.log_errors = False  # the client's error goes back to the client, not the log
        options.max_mem = REGEX_MAX_MEM
        try:
            return re2.compile(pattern, options)
        except re2.error as e:
            detail = e.args[0] if e.args else e
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            self.fail(f"invalid regular expression: {detail}", at)


def _selector_text(path: list[str]) -> str:
    out = ""
    for part in path:
        if _is_name_start(part[:1]) and all(_is_name_char(c) for c in part):
            out = f"{out}.{part}" if out else part
        else:
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


def _kind(shape: Shape) -> str:
    if isinstance(shape, Scalar):
        return shape.kind
    if isinstance(shape, ListOf):
        return "objects" if isinstance(shape.item, Struct) else "list"
    if isinstance(shape, MapOf):
        return "map"
    return "struct"


def _zero(shape: Shape) -> Any:
    if isinstance(shape, Scalar):
        return _ZERO[shape.kind]
    if isinstance(shape, ListOf):
        return ()
    return {}


# -- evaluation --------------------------------------------------------------------------------


def _eval(node: Node, obj: Any) -> bool:
    if isinstance(node, Match):
        return _match(node, obj)
    if isinstance(node, And):
        return all(_eval(n, obj) for n in node.operands)
    if isinstance(node, Or):
        return any(_eval(n, obj) for n in node.operands)
    return not _eval(node.operand, obj)


def _field(obj: Any, key: str) -> Any:
    if not isinstance(obj, Mapping):
        return None
    if key in obj:
        return obj[key]
    # Consul's JSON spells a few keys in lower case ("address"/"port" of tagged addresses)
    # where its selectors use the Go field names; accept either spelling.
    low = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _values(steps: tuple[Step, ...], obj: Any) -> list[Any]:
    current = [obj]
    for step in steps:
        nxt: list[Any] = []
        for v in current:
            if v is _MISSING:
                nxt.append(v)
            elif step[0] == "each":
                nxt.extend(v if isinstance(v, list | tuple) else ())
            elif step[0] == "field":
                got = _field(v, step[1])
                nxt.append(step[2] if got is None else got)
            else:  # a map key
                nxt.append(v[step[1]] if isinstance(v, Mapping) and step[1] in v else _MISSING)
        current = nxt
    return current


def _holds(op: str, want: Any, v: Any) -> bool:
    if v is _MISSING:
        return op == EMPTY
    if op == EQ:
        if isinstance(want, bool):
            return isinstance(v, bool) and v is want
        if isinstance(want, int):
            return isinstance(v, int) and not isinstance(v, bool) and v == want
        return isinstance(v, str) and v == want
    if op == CONTAINS:
        if isinstance(v, str):
            return isinstance(want, str) and want in v
        if isinstance(v, Mapping):
            return want in v
        if isinstance(v, list | tuple):
            return any(_holds(EQ, want, x) for x in v)
        return False
    if op == MATCHES:
        return isinstance(v, str) and want.search(v) is not None
    # EMPTY
    return v is None or (isinstance(v, str | list | tuple | Mapping) and len(v) == 0)


def _match(m: Match, obj: Any) -> bool:
    found = any(_holds(m.op, m.value, v) for v in _values(m.steps, obj))
    return not found if m.negate else found
