"""Sealing secrets (CA private keys, the Vault token) before they reach the store.

AES-256-GCM with a random 96-bit nonce per seal, and the document's name as associated data,
so a sealed value copied under another name does not open. The key comes from the server's
configuration (``connect.ca_seal_key``, base64 of 32 bytes). Without one, a SQLite server
keeps a generated key in ``<data_dir>/ca-seal.key`` (mode 0600), which is as safe as the
database beside it and no safer; PostgreSQL replicas must share a configured key.
"""

from __future__ import annotations

import base64
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trellis.api.datadir import private_file
from trellis.api.errors import ConfigError, SealError

__all__ = ["SealError", "Sealer", "load_sealer"]


class Sealer:
    def __init__(self, key: bytes, source: str = "connect.ca_seal_key") -> None:
        if len(key) != 32:
            raise ConfigError(f"the CA seal key ({source}) must be 32 bytes (base64-encoded)")
        self._aead = AESGCM(key)
        #: Where the key came from, for the operator: the setting, or the key file's path.
        self.source = source

    def seal(self, name: str, plaintext: str) -> str:
        nonce = secrets.token_bytes(12)
        ct = self._aead.encrypt(nonce, plaintext.encode(), name.encode())
        return "v1:" + base64.b64encode(nonce + ct).decode()

    def open(self, name: str, sealed: str) -> str:
        """The plaintext of ``sealed``; SealError (the operator's to fix) if it does not open."""
        if not isinstance(sealed, str) or not sealed.startswith("v1:"):
            raise SealError(
                f"the CA's secret {name!r} in the store is not a sealed value (damaged?)"
            )
        try:
            raw = base64.b64decode(sealed[3:], validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], name.encode()).decode()
        except (InvalidTag, ValueError):  # binascii.Error is a ValueError
            raise SealError(
                f"the CA's secret {name!r} cannot be opened with this server's CA seal key"
                f" (from {self.source}): use the key the CA was set up with, the same on every"
                " server that shares this store (connect.ca_seal_key, base64 of 32 bytes; a"
                " SQLite server without it keeps its key in <data_dir>/ca-seal.key)"
            ) from None


def load_sealer(configured: str, data_dir: str, *, shared_store: bool) -> Sealer:
    """The sealer from the configured key, or from (or into) ``<data_dir>/ca-seal.key``."""
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except ValueError:
            raise ConfigError("connect.ca_seal_key is not valid base64") from None
        return Sealer(key, "connect.ca_seal_key")
    if shared_store or not data_dir:
        raise ConfigError(
            "set connect.ca_seal_key (base64 of 32 random bytes, the same on every server):"
            " servers sharing a PostgreSQL store must share the key that seals CA keys"
        )
    path = os.path.join(data_dir, "ca-seal.key")
    try:
        return _key_file(path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another worker made it a moment ago (the master normally makes it before forking).
        return _key_file(path)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return Sealer(key, path)


def _key_file(path: str) -> Sealer:
    """The sealer of an existing key file; ConfigError (the operator's) if it holds no key."""
    with open(path, "rb") as f:
        text = f.read().strip()
    try:
        private_file(path, create=False)  # one made readable by others: no longer
    except OSError as e:
        raise ConfigError(f"cannot make {path} private: {e.strerror}") from None
    try:
        return Sealer(base64.b64decode(text, validate=True), path)
    except ValueError:
        raise ConfigError(f"{path} does not hold a CA seal key (base64 of 32 bytes)") from None
