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

from trellis.api.errors import ConfigError


class SealError(Exception):
    """A sealed value does not open with this key (wrong key, or tampered)."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("the CA seal key must be 32 bytes (base64-encoded)")
        self._aead = AESGCM(key)

    def seal(self, name: str, plaintext: str) -> str:
        nonce = secrets.token_bytes(12)
        ct = self._aead.encrypt(nonce, plaintext.encode(), name.encode())
        return "v1:" + base64.b64encode(nonce + ct).decode()

    def open(self, name: str, sealed: str) -> str:
        if not isinstance(sealed, str) or not sealed.startswith("v1:"):
            raise SealError(f"{name}: not a sealed value")
        raw = base64.b64decode(sealed[3:])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], name.encode()).decode()
        except InvalidTag:
            raise SealError(
                f"{name}: cannot be opened with this server's CA seal key"
                " (is connect.ca_seal_key the same on every server?)"
            ) from None


def load_sealer(configured: str, data_dir: str, *, shared_store: bool) -> Sealer:
    """The sealer from the configured key, or from (or into) ``<data_dir>/ca-seal.key``."""
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except ValueError:
            raise ConfigError("connect.ca_seal_key is not valid base64") from None
        return Sealer(key)
    if shared_store or not data_dir:
        raise ConfigError(
            "set connect.ca_seal_key (base64 of 32 random bytes, the same on every server):"
            " servers sharing a PostgreSQL store must share the key that seals CA keys"
        )
    path = os.path.join(data_dir, "ca-seal.key")
    try:
        with open(path, "rb") as f:
            return Sealer(base64.b64decode(f.read().strip()))
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another worker made it a moment ago (the master normally makes it before forking).
        with open(path, "rb") as f:
            return Sealer(base64.b64decode(f.read().strip()))
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return Sealer(key)
