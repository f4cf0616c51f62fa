"""``trellis kv ...``: the key/value store, with the output and messages of ``consul kv``."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from typing import Any

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    UsageError,
    add_format_flag,
    at_most,
    tabulate,
    uint,
)
from trellis.proxy.client import APIError, KVPair


def _strip(key: str) -> str:
    # Keys never start with "/", but people type "/foo"; Consul strips it for them too.
    return key[1:] if key.startswith("/") else key


def _data_arg(ctx: Context, data: str) -> bytes:
    """DATA as Consul reads it: ``@file``, ``-`` for stdin, else the text itself."""
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise CommandError(f"Error! Failed to read file: {e.strerror}: {data[1:]}") from None
    if data == "-":
        return ctx.read_stdin()
    return data.encode("utf-8")


# -- put ---------------------------------------------------------------------------------------


def _put_flags(p: FlagParser) -> None:
    p.flag(
        "cas",
        action="store_true",
        help="Perform a Check-And-Set operation. Specifying this value also requires the "
        "-modify-index flag to be set. The default value is false.",
    )
    p.flag(
        "flags",
        type=uint,
        default=None,
        metavar="uint",
        help="Unsigned integer value to assign to this key-value pair. Trellis does not read "
        "it, so clients can use it however makes sense for them. The default value is 0.",
    )
    p.flag(
        "base64",
        action="store_true",
        help="Treat the data as base 64 encoded. The default value is false.",
    )
    p.flag(
        "modify-index",
        type=uint,
        default=0,
        metavar="uint",
        help="Unsigned integer representing the ModifyIndex of the key. This is used in "
        "combination with the -cas flag.",
    )


def kv_put(ctx: Context, ns: argparse.Namespace) -> int:
    args = ns.args
    if not args:
        raise UsageError("Error! Missing KEY argument")
    if len(args) > 2:
        raise UsageError(f"Error! Too many arguments (expected 1 or 2, got {len(args)})")
    key = args[0]
    data = _data_arg(ctx, args[1]) if len(args) == 2 and args[1] else b""
    if ns.base64:
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise CommandError(f"Error! Cannot base 64 decode data: {e}") from None
    if ns.cas and ns.modify_index == 0:
        raise CommandError("Must specify -modify-index with -cas!")
    with ctx.client(ns) as c:
        if ns.cas:
            try:
                ok = c.kv_put(key, data, flags=ns.flags, cas=ns.modify_index)
            except APIError as e:
                raise CommandError(f"Error! Did not write to {key}: {e.message}") from None
            if not ok:
                raise CommandError(f"Error! Did not write to {key}: CAS failed")
        else:
            try:
                ok = c.kv_put(key, data, flags=ns.flags)
            except APIError as e:
                raise CommandError(f"Error! Failed writing data: {e.message}") from None
            if not ok:
                raise CommandError("Error! Failed writing data: the server did not write it")
    ctx.out(f"Success! Data written to: {key}")
    return 0


# -- get ---------------------------------------------------------------------------------------


def _get_flags(p: FlagParser) -> None:
    p.flag("base64", action="store_true", help="Base64 encode the value. The default is false.")
    p.flag(
        "detailed",
        action="store_true",
        help="Provide additional metadata about the key in addition to the value such as the "
        "ModifyIndex and any flags that may have been set on the key. The default is false.",
    )
    p.flag(
        "keys",
        action="store_true",
        help="List keys which start with the given prefix, but not their values. This is "
        "commonly combined with the -separator option. The default value is false.",
    )
    p.flag(
        "recurse",
        action="store_true",
        help="Recursively look at all keys prefixed with the given path. The default is false.",
    )
    p.flag(
        "separator",
        default="/",
        metavar="string",
        help='String to use as a separator between keys. The default value is "/", but this '
        "option is only taken into account when paired with the -keys flag.",
    )
    add_format_flag(p)


def _value(pair: KVPair, b64: bool) -> bytes:
    v = pair.value or b""
    return base64.b64encode(v) if b64 else v


def _detailed(pair: KVPair, b64: bool) -> str:
    rows = [
        ("CreateIndex", str(pair.create_index)),
        ("Flags", str(pair.flags)),
        ("Key", pair.key),
        ("LockIndex", str(pair.lock_index)),
        ("ModifyIndex", str(pair.modify_index)),
        ("Session", pair.session or "-"),
        ("Value", _value(pair, b64).decode("utf-8", errors="replace")),
    ]
    return tabulate(rows)


def kv_get(ctx: Context, ns: argparse.Namespace) -> int:
    at_most(ns.args, 1)
    key = _strip(ns.args[0]) if ns.args else ""
    if not key and not (ns.recurse or ns.keys):
        raise UsageError("Error! Missing KEY argument")
    as_json = ns.format == "json"
    with ctx.client(ns) as c:
        try:
            if ns.keys:
                keys: list[str] = c.kv_get(key, keys=True, separator=ns.separator).value
                if as_json:
                    ctx.print_json(keys)
                else:
                    for k in keys:
                        ctx.out(k)
                return 0
            if ns.recurse:
                pairs: list[KVPair] = c.kv_get(key, recurse=True).value
                if as_json:
                    ctx.print_json([p.to_json() for p in pairs])
                    return 0
                for i, pair in enumerate(pairs):
                    if ns.detailed:
                        ctx.out(_detailed(pair, ns.base64))
                        if i < len(pairs) - 1:
                            ctx.out("")
                    else:
                        ctx.out_bytes(pair.key.encode() + b":" + _value(pair, ns.base64))
                return 0
            found: KVPair | None = c.kv_get(key).value
        except APIError as e:
            raise CommandError(f"Error! {e.message}") from None
    if found is None:
        raise CommandError(f"Error! No key exists at: {key}")
    if as_json:
        ctx.print_json(found.to_json())
    elif ns.detailed:
        ctx.out(_detailed(found, ns.base64))
    else:
        ctx.out_bytes(_value(found, ns.base64))
    return 0


# -- delete ------------------------------------------------------------------------------------


def _delete_flags(p: FlagParser) -> None:
    p.flag(
        "cas",
        action="store_true",
        help="Perform a Check-And-Set operation. Specifying this value also requires the "
        "-modify-index flag to be set. The default value is false.",
    )
    p.flag(
        "modify-index",
        type=uint,
        default=0,
        metavar="uint",
        help="Unsigned integer representing the ModifyIndex of the key. This is used in "
        "combination with the -cas flag.",
    )
    p.flag(
        "recurse",
        action="store_true",
        help="Recursively delete all keys with the path. The default value is false.",
    )


def kv_delete(ctx: Context, ns: argparse.Namespace) -> int:
    at_most(ns.args, 1)
    key = _strip(ns.args[0]) if ns.args else ""
    if not key and not ns.recurse:
        raise UsageError("Error! Missing KEY argument")
    if ns.cas and ns.modify_index == 0:
        raise CommandError(
            "Cannot delete a key that does not exist. Provide a -modify-index greater than 0."
        )
    if ns.modify_index and not ns.cas:
        raise CommandError("Cannot specify -modify-index without -cas!")
    if ns.recurse and ns.cas:
        raise CommandError("Cannot specify both -cas and -recurse!")
    with ctx.client(ns) as c:
        if ns.recurse:
            try:
                c.kv_delete(key, recurse=True)
            except APIError as e:
                raise CommandError(f"Error! Did not delete prefix {key}: {e.message}") from None
            ctx.out(f"Success! Deleted keys with prefix: {key}")
            return 0
        if ns.cas:
            try:
                ok = c.kv_delete(key, cas=ns.modify_index)
            except APIError as e:
                raise CommandError(f"Error! Did not delete key {key}: {e.message}") from None
            if not ok:
                raise CommandError(f"Error! Did not delete key {key}: CAS failed")
        else:
            try:
                c.kv_delete(key)
            except APIError as e:
                raise CommandError(f"Error deleting key {key}: {e.message}") from None
    ctx.out(f"Success! Deleted key: {key}")
    return 0


# -- list (a Trellis addition) -----------------------------------------------------------------


def _list_flags(p: FlagParser) -> None:
    p.flag(
        "separator",
        default="",
        metavar="string",
        help="Roll keys up at the first occurrence of this string after the prefix, as "
        "'kv get -keys' does. By default every key is listed in full.",
    )
    add_format_flag(p)


def kv_list(ctx: Context, ns: argparse.Namespace) -> int:
    at_most(ns.args, 1)
    prefix = _strip(ns.args[0]) if ns.args else ""
    with ctx.client(ns) as c:
        try:
            keys = c.kv_get(prefix, keys=True, separator=ns.separator or None).value
        except APIError as e:
            raise CommandError(f"Error! {e.message}") from None
    if ns.format == "json":
        ctx.print_json(keys)
    else:
        for k in keys:
            ctx.out(k)
    return 0


# -- export and import -------------------------------------------------------------------------


def kv_export(ctx: Context, ns: argparse.Namespace) -> int:
    at_most(ns.args, 1)
    prefix = _strip(ns.args[0]) if ns.args else ""
    with ctx.client(ns) as c:
        try:
            pairs: list[KVPair] = c.kv_get(prefix, recurse=True).value
        except APIError as e:
            raise CommandError(f"Error! {e.message}") from None
    entries = [
        {"key": p.key, "flags": p.flags, "value": base64.b64encode(p.value or b"").decode()}
        for p in pairs
    ]
    # Consul writes json.MarshalIndent(entries, "", "\t").
    ctx.out(json.dumps(entries, indent="\t", ensure_ascii=False))
    return 0


def _entries(data: bytes) -> list[dict[str, Any]]:
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise CommandError(f"Cannot unmarshal data: {err}") from None
    if not isinstance(doc, list):
        raise CommandError("Cannot unmarshal data: expected a JSON array of entries")
    for i, e in enumerate(doc):
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise CommandError(f"Cannot unmarshal data: entry {i} has no string 'key'")
        flags = e.get("flags", 0)
        if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags < 2**64:
            raise CommandError(f"Cannot unmarshal data: entry {i} has bad 'flags'")
        if not isinstance(e.get("value", ""), str):
            raise CommandError(f"Cannot unmarshal data: entry {i} has a 'value' that is no string")
    return doc


def kv_import(ctx: Context, ns: argparse.Namespace) -> int:
    if not ns.args:
        raise UsageError("Error! Missing DATA argument")
    if len(ns.args) > 1:
        raise UsageError(f"Error! Too many arguments (expected 1, got {len(ns.args)})")
    if not ns.args[0]:
        raise UsageError("Error! Empty DATA argument")
    entries = _entries(_data_arg(ctx, ns.args[0]))
    with ctx.client(ns) as c:
        for e in entries:
            key = e["key"]
            try:
                value = base64.b64decode(e.get("value", ""), validate=True)
            except (binascii.Error, ValueError) as err:
                raise CommandError(f"Error base 64 decoding value for key {key}: {err}") from None
            try:
                c.kv_put(key, value, flags=e.get("flags", 0))
            except APIError as err:
                raise CommandError(
                    f"Error! Failed writing data for key {key}: {err.message}"
                ) from None
            ctx.out(f"Imported: {key}")
    return 0


def register(r: Registry) -> None:
    r.group(("kv",), "Interact with the key-value store")
    r.add(
        Command(
            ("kv", "put"),
            "Sets or updates data in the KV store",
            "trellis kv put [options] KEY [DATA]",
            kv_put,
            _put_flags,
            description="""
            Writes the data to the given path in the key-value store.

                $ trellis kv put config/redis/maxconns 5

            The data can be read from a file by prefixing its name with "@", or from
            stdin with "-":

                $ trellis kv put config/program/license @license.lic
                $ echo "abcd1234" | trellis kv put config/program/license -

            To perform a Check-And-Set operation, give -cas and the key's -modify-index:

                $ trellis kv put -cas -modify-index=844 config/redis/maxconns 5
            """,
        ),
        Command(
            ("kv", "get"),
            "Retrieves or lists data from the KV store",
            "trellis kv get [options] [KEY_OR_PREFIX]",
            kv_get,
            _get_flags,
            description="""
            Retrieves the value at the given key. If no key exists with that name, an
            error is returned. -detailed adds the key's metadata; -recurse lists every
            key-value pair under a prefix and -keys only the keys.

                $ trellis kv get -recurse config/
            """,
        ),
        Command(
            ("kv", "delete"),
            "Removes data from the KV store",
            "trellis kv delete [options] KEY_OR_PREFIX",
            kv_delete,
            _delete_flags,
            description="""
            Removes the value at the given key; with -recurse, every key under the prefix.
            If no key exists at the path, nothing is done.
            """,
        ),
        Command(
            ("kv", "list"),
            "Lists the keys under a prefix",
            "trellis kv list [options] [PREFIX]",
            kv_list,
            _list_flags,
            description="Lists the keys under the given prefix (all keys without one), one a line.",
        ),
        Command(
            ("kv", "export"),
            "Exports a tree from the KV store as JSON",
            "trellis kv export [options] [KEY_OR_PREFIX]",
            kv_export,
            description="""
            Writes the key-value pairs under the prefix to stdout as JSON, which
            "trellis kv import" (and "consul kv import") reads back.
            """,
        ),
        Command(
            ("kv", "import"),
            "Imports a tree stored as JSON to the KV store",
            "trellis kv import [options] [DATA]",
            kv_import,
            description="""
            Imports key-value pairs from the JSON that "trellis kv export" writes. Read it
            from a file with "@filename.json", or from stdin with "-".
            """,
        ),
    )
