"""What the store raises, in its own words: no HTTP status here.

The store answers "no such thing" with ``None`` (or ``False``) from its reads and deletes; it
raises only when a write cannot be done as asked. Callers at the boundary say what each error
means to *their* caller: ``trellis.api.app`` turns them into the HTTP error tree
(``trellis.api.errors``) in one place, DNS and the server's start-up catch
``StoreUnavailable``. Each class says who is at fault.

``StoreUnavailable`` is the one exception: it stays in ``trellis.api.errors`` (a 503), because
the store *is* where driver exceptions are translated (STYLE.md: driver exceptions become
Trellis errors where they happen), and domain code outside the store raises it too. It is
re-exported here so that this module names everything the store may raise.
"""

from __future__ import annotations

from trellis.api.errors import StoreUnavailable

__all__ = [
    "InvalidSession",
    "NotFoundInStore",
    "SnapshotRefused",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
    "UnstorableValue",
]


class StoreError(Exception):
    """Base of the store's own refusals (not of ``StoreUnavailable``, a dependency failure)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StoreConflict(StoreError):
    """The write contradicts what is stored: the ID, name or pair is taken by another object.

    The caller's fault (it asked to create what exists), or a race it lost; nothing was
    written. The HTTP boundary answers 409.
    """


class NotFoundInStore(StoreError):
    """A write that names an existing object (an update by ID) found it gone. Nothing was
    written. The caller's fault, or it lost a race with a delete; the HTTP boundary answers
    404."""


class UnstorableValue(StoreError):
    """A value that one of the two databases cannot hold (a NUL character in text). Refused on
    both, so that the stores keep one contract; the sender's fault (HTTP 400)."""


class InvalidSession(StoreError):
    """A session write or a lock names what does not allow it: an unknown session (acquire,
    release), a node or check that is not registered, or a check that is critical (create).
    Nothing was written. The caller's fault; the HTTP boundary answers 400."""


class SnapshotRefused(StoreError):
    """A snapshot that does not fit this store: another schema version, other tables or
    columns, or rows the tables cannot hold. Nothing was written. The sender's fault (HTTP
    400)."""
