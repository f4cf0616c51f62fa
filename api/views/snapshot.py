"""``/v1/snapshot``: save the whole store as one archive, and restore one.

``GET`` reads every table of state in one read snapshot (``Store.snapshot_dump``) and answers
the archive (``trellis.api.snapshot``) with the index it is the state of. ``PUT`` checks the
whole archive first (gzip, tar, manifest, format version, checksum, counts, and that this
server's CA seal key opens what it sealed), then replaces the state in one transaction
(``Store.snapshot_restore``: every index renumbered above the current one, one change that
wakes every parked query), then puts back what this server adds at start (its own node, the
built-in ACL objects, a CA if the archive has none). Anything wrong with the archive is the
sender's 400, and nothing has changed.

ACL: ``acl:write`` for both, as Consul's (a snapshot holds every token, so reading it is as
strong as writing ACLs).
"""

from __future__ import annotations

import datetime as dt
import time

from flask import Blueprint, Response, request

from trellis.api import __version__
from trellis.api import snapshot as archive
from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, PayloadTooLarge, SealError
from trellis.api.http import add_index_headers, services
from trellis.api.store.snapshot import StoreDump

bp = Blueprint("snapshot", __name__)

#: What every archive carries sealed with its server's CA seal key (see ``restore``).
SEAL_CHECK = ("snapshot/seal-check", "trellis snapshot")


@bp.get("/v1/snapshot")
def save() -> Response:
    acl.require(acl.current().acl_write(), "acl:write")
    svc = services()
    dump = svc.store.snapshot_dump()
    state, counts = archive.encode_state(
        (name, sorted(rows, key=_order)) for name, (_, rows) in dump.tables.items()
    )
    manifest = archive.Manifest(
        store=svc.store_kind,
        schema_version=dump.schema_version,
        index=dump.index,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        trellis_version=__version__,
        tables={
            name: archive.TableInfo(cols, counts[name]) for name, (cols, _) in dump.tables.items()
        },
        sha256=archive.sha256(state),
        seal_check=svc.ca.sealer.seal(*SEAL_CHECK),
    )
    resp = Response(archive.write_archive(manifest, state), mimetype="application/gzip")
    resp.headers["Content-Disposition"] = f'attachment; filename="trellis-{dump.index}.snap"'
    add_index_headers(resp, dump.index)
    return resp


def _order(row: tuple) -> tuple:
    """Rows in one order whatever the store returned them in (so two saves of one state are
    the same archive): by their values, each as a comparable (kind, value) pair."""
    return tuple((v is None, type(v).__name__, v if v is not None else 0) for v in row)


@bp.put("/v1/snapshot")
def restore() -> Response:
    acl.require(acl.current().acl_write(), "acl:write")
    svc = services()
    # The app's body limit is for JSON bodies; an archive is as large as the store.
    request.max_content_length = archive.MAX_ARCHIVE_BYTES
    if (request.content_length or 0) > archive.MAX_ARCHIVE_BYTES:
        raise PayloadTooLarge(f"a snapshot may be at most {archive.MAX_ARCHIVE_BYTES} bytes")
    data = request.get_data(cache=False)
    try:
        got = archive.read_archive(data)
    except archive.ArchiveError as e:
        raise BadRequest(f"snapshot refused, nothing changed: {e.message}") from None
    try:
        svc.ca.sealer.open(SEAL_CHECK[0], got.manifest.seal_check)
    except SealError:
        raise BadRequest(
            "snapshot refused, nothing changed: it was saved by a server with another CA seal"
            " key, so the CA keys in it would not open here; give this server that key"
            " (connect.ca_seal_key, or a SQLite server's <data_dir>/ca-seal.key)"
        ) from None
    dump = StoreDump(
        schema_version=got.manifest.schema_version,
        index=got.manifest.index,
        tables={name: (info.columns, got.rows[name]) for name, info in got.manifest.tables.items()},
    )
    index = svc.store.snapshot_restore(dump, now=time.time())
    _after_restore()
    resp = Response(b"", status=200)
    add_index_headers(resp, index)
    return resp


def _after_restore() -> None:
    """What a server puts in the store when it starts, put back if the archive lacks it."""
    from trellis.api.app import _init_ca, register_local_node

    svc = services()
    if svc.settings.register_node:
        register_local_node(svc.store, svc.settings)
    if svc.settings.acl_enabled:
        acl.ensure_builtins()
    _init_ca(svc.ca)
