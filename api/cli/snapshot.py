"""``trellis snapshot save|restore|inspect FILE``: backups of the whole store, as ``consul
snapshot`` takes them.

``save`` writes the server's archive (``GET /v1/snapshot``) to FILE, but only after checking it
as a restore would (``trellis.api.snapshot.read_archive``), and through a temporary file
renamed into place, so FILE is never a partial archive. ``restore`` checks FILE the same way
before sending it: a damaged file is refused here, with the reason, without a request.
``inspect`` reads FILE alone (no server): the manifest, and whether the state matches its
checksum.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from trellis.api import snapshot as archive
from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    add_format_flag,
    columnize,
    exactly,
)
from trellis.proxy.client import APIError

#: How long a save or a restore may take (the store is read or written whole).
TIMEOUT = 600.0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(archive.MAX_ARCHIVE_BYTES + 1)
    except OSError as e:
        raise CommandError(f"Error! Cannot read snapshot file {path}: {e.strerror}") from None


def snapshot_save(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 1, "file")
    path = ns.args[0]
    with ctx.client(ns, timeout=TIMEOUT) as c:
        try:
            data = c.request("GET", "/v1/snapshot").body
        except APIError as e:
            raise CommandError(f"Error! Failed to get snapshot: {e.message}") from None
    try:
        got = archive.read_archive(data)
    except archive.ArchiveError as e:
        raise CommandError(
            f"Error! The server's snapshot failed verification: {e.message}"
        ) from None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".trellis-snapshot-", dir=directory)
    except OSError as e:
        raise CommandError(f"Error! Cannot write in {directory}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CommandError(f"Error! Cannot write snapshot file {path}: {e.strerror}") from None
    ctx.out(f"Saved and verified snapshot to index {got.manifest.index}")
    return 0


def snapshot_restore(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 1, "file")
    path = ns.args[0]
    data = _read(path)
    try:
        archive.read_archive(data)
    except archive.ArchiveError as e:
        raise CommandError(f"Error! Snapshot file {path} is not restorable: {e.message}") from None
    with ctx.client(ns, timeout=TIMEOUT) as c:
        try:
            c.request("PUT", "/v1/snapshot", content=data)
        except APIError as e:
            raise CommandError(f"Error! Failed to restore snapshot: {e.message}") from None
    ctx.out("Restored snapshot")
    return 0


def _inspect_flags(p: FlagParser) -> None:
    add_format_flag(p)


def snapshot_inspect(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 1, "file")
    path = ns.args[0]
    data = _read(path)
    try:
        manifest, intact = archive.read_manifest(data)
    except archive.ArchiveError as e:
        raise CommandError(f"Error! Snapshot file {path}: {e.message}") from None
    if ns.format == "json":
        out = manifest.to_json()
        out.pop("SealCheck", None)
        ctx.print_json({**out, "Size": len(data), "Verified": intact})
    else:
        rows = [
            (" Index", str(manifest.index)),
            (" Store", manifest.store),
            (" Schema", str(manifest.schema_version)),
            (" Version", str(manifest.version)),
            (" Created", manifest.created_at),
            (" Trellis", manifest.trellis_version),
            (" Size", str(len(data))),
            (" SHA256", manifest.sha256 + ("" if intact else " (DOES NOT MATCH: damaged)")),
        ]
        ctx.out(columnize(rows, glue="   "))
        ctx.out()
        table = [(" Table", "Rows")]
        table += [(f" {name}", str(t.rows)) for name, t in manifest.tables.items()]
        table.append((" Total", str(sum(t.rows for t in manifest.tables.values()))))
        ctx.out(columnize(table, glue="   "))
    if not intact:
        raise CommandError(
            f"Error! Snapshot file {path} is damaged: its state does not match the checksum"
        )
    return 0


def register(r: Registry) -> None:
    r.group(("snapshot",), "Saves, restores and inspects snapshots of the whole store")
    r.add(
        Command(
            ("snapshot", "save"),
            "Saves a snapshot of the whole store to a file",
            "trellis snapshot save [options] FILE",
            snapshot_save,
            description="Saves the whole store (catalog, K/V, sessions, intentions, ACLs, the\n"
            'CA) as of one index to FILE, after checking it. Needs an acl = "write" token.',
        ),
        Command(
            ("snapshot", "restore"),
            "Replaces the whole store with a snapshot",
            "trellis snapshot restore [options] FILE",
            snapshot_restore,
            description="Replaces the whole store with the snapshot in FILE, in one\n"
            'transaction. A damaged file changes nothing. Needs an acl = "write" token.',
        ),
        Command(
            ("snapshot", "inspect"),
            "Prints the manifest of a snapshot file",
            "trellis snapshot inspect [options] FILE",
            snapshot_inspect,
            _inspect_flags,
            description="Prints the index, the store it came from, the row count of each\n"
            "table and the checksum of a snapshot file, and checks the checksum.\n"
            "Reads only the file.",
            http=False,
        ),
    )
