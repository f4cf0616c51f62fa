"""The snapshot archive: a whole store as one file, and the checks that refuse a bad one.

Pure: no Flask, no store, no sockets. The server (``trellis.api.views.snapshot``) writes and
reads archives with it, and so does ``trellis snapshot inspect``, offline.

The format
----------
A gzip-compressed tar (``tar tzf`` lists it) holding exactly two regular files, in this order:

* ``manifest.json``: ``Format`` (``"trellis-snapshot"``), ``Version`` (of this format),
  ``Store`` (the kind of store it was read from), ``SchemaVersion`` (the store's last
  migration), ``Index`` (the store's change index when it was read), ``CreatedAt``,
  ``TrellisVersion``, ``Tables`` (per table, in restore order: its ``Columns`` and how many
  ``Rows``), ``SHA256`` (of ``state.jsonl``, the bytes as stored) and ``SealCheck`` (a value
  sealed with the CA seal key of the server that wrote it, so that a server with another key
  refuses the archive before touching anything: the CA keys inside would not open).
* ``state.jsonl``: one row per line, ``["table", [value, ...]]``, values in the manifest's
  column order, tables in the manifest's order. A value is JSON null, a number, a string, or
  ``{"b64": "..."}`` for bytes (K/V values).

``read_archive`` checks everything it can without a store: that the body is a gzip'd tar, that
it holds the two members and nothing else, the manifest's shape, the format and its version,
the checksum, and that every line names a table of the manifest with as many values as it has
columns, in the manifest's order, with the counts it claims. Every refusal is an
``ArchiveError``: the sender's fault (a corrupt, truncated or foreign file), an HTTP 400.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMAT = "trellis-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.jsonl"
#: The largest archive (compressed) and state (uncompressed) a restore reads: the archive is
#: held in memory while it is checked, so that nothing is written before it is known good.
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024
MAX_STATE_BYTES = 2 * 1024 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024

Value = None | int | float | str | bytes


class ArchiveError(Exception):
    """The archive is not one this server can restore: corrupt, truncated, not an archive,
    another format or version, or a checksum that does not match. The sender's fault; nothing
    was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class TableInfo:
    columns: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class Manifest:
    store: str
    schema_version: int
    index: int
    created_at: str
    trellis_version: str
    tables: Mapping[str, TableInfo]
    sha256: str
    seal_check: str
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "Format": FORMAT,
            "Version": self.version,
            "Store": self.store,
            "SchemaVersion": self.schema_version,
            "Index": self.index,
            "CreatedAt": self.created_at,
            "TrellisVersion": self.trellis_version,
            "Tables": {
                name: {"Columns": list(t.columns), "Rows": t.rows}
                for name, t in self.tables.items()
            },
            "SHA256": self.sha256,
            "SealCheck": self.seal_check,
        }


@dataclass(frozen=True)
class Archive:
    manifest: Manifest
    #: Per table of the manifest (in its order), the rows, each a tuple in column order.
    rows: Mapping[str, Sequence[tuple[Value, ...]]]


# -- writing -------------------------------------------------------------------------------------


def _encode(v: Value) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(v)).decode("ascii")}
    return v


def encode_state(
    tables: Iterable[tuple[str, Iterable[Sequence[Value]]]],
) -> tuple[bytes, dict[str, int]]:
    """``state.jsonl`` for these tables' rows, and the row count of each table."""
    out = io.BytesIO()
    counts: dict[str, int] = {}
    for name, rows in tables:
        n = 0
        for row in rows:
            line = json.dumps([name, [_encode(v) for v in row]], separators=(",", ":"))
            out.write(line.encode("utf-8") + b"\n")
            n += 1
        counts[name] = n
    return out.getvalue(), counts


def write_archive(manifest: Manifest, state: bytes) -> bytes:
    """The archive of ``state`` (from ``encode_state``) under ``manifest`` (whose checksum
    must be that of ``state``)."""
    buf = io.BytesIO()
    # mtime 0 and fixed member times: the same state gives the same archive, byte for byte.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in (
                (MANIFEST, json.dumps(manifest.to_json(), indent=2).encode() + b"\n"),
                (STATE, state),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading -------------------------------------------------------------------------------------


def read_archive(data: bytes) -> Archive:
    """The archive in ``data``, checked whole (see the module docstring); ArchiveError if
    anything about it is wrong."""
    manifest_raw, state = _members(data)
    manifest = parse_manifest(manifest_raw)
    got = sha256(state)
    if got != manifest.sha256:
        raise ArchiveError(
            f"the snapshot's checksum does not match: its state hashes to SHA-256 {got}, its"
            f" manifest says {manifest.sha256} (the file is damaged)"
        )
    return Archive(manifest, _rows(manifest, state))


def read_manifest(data: bytes) -> tuple[Manifest, bool]:
    """The manifest, and whether the state matches its checksum (for ``inspect``, which shows
    a damaged archive's manifest too)."""
    manifest_raw, state = _members(data)
    manifest = parse_manifest(manifest_raw)
    return manifest, sha256(state) == manifest.sha256


def _members(data: bytes) -> tuple[bytes, bytes]:
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"the snapshot is larger than {MAX_ARCHIVE_BYTES} bytes")
    if not data:
        raise ArchiveError("the snapshot is empty: send the archive that GET /v1/snapshot gave")
    if data[:2] != b"\x1f\x8b":
        raise ArchiveError(
            "the body is not a snapshot archive (not gzip data): send the archive that"
            " GET /v1/snapshot (or trellis snapshot save) wrote"
        )
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in _iter_members(tar):
                name = member.name
                if name not in (MANIFEST, STATE) or name in found or not member.isfile():
                    raise ArchiveError(
                        f"the snapshot holds an unexpected member {name!r}: a snapshot holds"
                        f" only {MANIFEST} and {STATE}"
                    )
                limit = MAX_MANIFEST_BYTES if name == MANIFEST else MAX_STATE_BYTES
                if member.size > limit:
                    raise ArchiveError(f"the snapshot's {name} is larger than {limit} bytes")
                f = tar.extractfile(member)
                if f is None:  # pragma: no cover - isfile() was checked
                    raise ArchiveError(f"the snapshot's {name} cannot be read")
                content = f.read(member.size + 1)
                if len(content) != member.size:
                    raise ArchiveError(f"the snapshot is truncated (in {name})")
                found[name] = content
            # The gzip trailer (its CRC and length) is checked only at the end of the stream:
            # read to it, so that damage after the last member is found too.
            fileobj = tar.fileobj
            if fileobj is not None:
                while fileobj.read(1 << 16):
                    pass
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; a truncated stream is an EOFError.
        raise ArchiveError(f"the snapshot is corrupt or truncated: {e}") from None
    for name in (MANIFEST, STATE):
        if name not in found:
            raise ArchiveError(f"the snapshot has no {name} (truncated, or not a snapshot)")
    return found[MANIFEST], found[STATE]


def _iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    count = 0
    while True:
        member = tar.next()
        if member is None:
            return
        count += 1
        if count > 2:
            raise ArchiveError("the snapshot holds more members than a snapshot has")
        yield member


def _field(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    v = d.get(name)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise ArchiveError(f"the snapshot's manifest has no valid {name!r}")
    return v


def parse_manifest(raw: bytes) -> Manifest:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveError(f"the snapshot's manifest is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("Format") != FORMAT:
        raise ArchiveError(f"the archive is not a Trellis snapshot (no Format {FORMAT!r})")
    version = _field(d, "Version", int)
    if version != VERSION:
        raise ArchiveError(
            f"the snapshot's format version is {version}; this server reads version {VERSION}"
        )
    tables_raw = _field(d, "Tables", dict)
    tables: dict[str, TableInfo] = {}
    for name, t in tables_raw.items():
        if not isinstance(t, dict):
            raise ArchiveError(f"the snapshot's manifest describes table {name!r} badly")
        cols = t.get("Columns")
        rows = t.get("Rows")
        if (
            not isinstance(cols, list)
            or not cols
            or not all(isinstance(c, str) for c in cols)
            or len(set(cols)) != len(cols)
            or not isinstance(rows, int)
            or isinstance(rows, bool)
            or rows < 0
        ):
            raise ArchiveError(f"the snapshot's manifest describes table {name!r} badly")
        tables[name] = TableInfo(tuple(cols), rows)
    digest = _field(d, "SHA256", str)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ArchiveError("the snapshot's manifest has no valid 'SHA256'")
    index = _field(d, "Index", int)
    schema = _field(d, "SchemaVersion", int)
    if index < 0 or schema < 0:
        raise ArchiveError("the snapshot's manifest has a negative index or schema version")
    return Manifest(
        store=_field(d, "Store", str),
        schema_version=schema,
        index=index,
        created_at=_field(d, "CreatedAt", str),
        trellis_version=_field(d, "TrellisVersion", str),
        tables=tables,
        sha256=digest,
        seal_check=_field(d, "SealCheck", str),
        version=version,
    )


def _decode(v: Any) -> Value:
    if v is None or (isinstance(v, str | int | float) and not isinstance(v, bool)):
        return v
    if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
        try:
            return base64.b64decode(v["b64"], validate=True)
        except ValueError:
            pass
    raise ArchiveError("the snapshot's state holds a value of no known kind")


def _rows(manifest: Manifest, state: bytes) -> dict[str, list[tuple[Value, ...]]]:
    order = list(manifest.tables)
    rows: dict[str, list[tuple[Value, ...]]] = {name: [] for name in order}
    at = 0  # tables come in the manifest's order
    for number, line in enumerate(state.splitlines(), start=1):
        try:
            item = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise ArchiveError(f"line {number} of the snapshot's state is not JSON") from None
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
        ):
            raise ArchiveError(f"line {number} of the snapshot's state is not a row")
        name, values = item
        if name not in rows:
            raise ArchiveError(f"line {number} names table {name!r}, not in the manifest")
        while order[at] != name:
            at += 1
            if at == len(order):
                raise ArchiveError(f"line {number}: table {name!r} out of the manifest's order")
        if len(values) != len(manifest.tables[name].columns):
            raise ArchiveError(
                f"line {number}: a row of {name!r} with {len(values)} values, not"
                f" {len(manifest.tables[name].columns)}"
            )
        rows[name].append(tuple(_decode(v) for v in values))
    for name, info in manifest.tables.items():
        if len(rows[name]) != info.rows:
            raise ArchiveError(
                f"the snapshot's state holds {len(rows[name])} rows of {name!r}; its manifest"
                f" says {info.rows}"
            )
    return rows
