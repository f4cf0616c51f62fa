"""The data dir and the files in it belong to the server's user alone.

The data dir holds the SQLite database (every K/V value, ACL token hashes, sealed CA keys) and
the key that seals CA keys. Other local users must neither read these files nor replace them:

* every file Trellis creates there is mode 0600, whatever the umask and whatever the
  directory's own mode. SQLite would make its database 0644 (its default, applied past the
  umask), so the store creates the file itself first; SQLite then gives the ``-wal`` and
  ``-shm`` files the database's mode.
* a file found there with group or other permission bits (a database made by an older
  version) is narrowed to its owner, with a warning.
* a data dir that group or others may write to is refused at start: whoever can write there
  can replace the database or the key file (or plant a symlink in their place).
"""

from __future__ import annotations

import logging
import os
import stat

from trellis.api.errors import ConfigError

log = logging.getLogger("trellis.datadir")


def check_dir(path: str) -> None:
    """ConfigError (the operator's to fix) if ``path`` is writable by group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"cannot use data dir {path}: {e.strerror}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"data dir {path} is writable by {_who(mode)} (mode {stat.S_IMODE(mode):04o}):"
            f" another local user could replace its files; run chmod go-w {path}"
        )


def _who(mode: int) -> str:
    group, other = bool(mode & stat.S_IWGRP), bool(mode & stat.S_IWOTH)
    return "group and others" if group and other else "group" if group else "others"


def private_file(path: str, *, create: bool) -> None:
    """Make ``path`` readable and writable by its owner only: create it empty with mode 0600
    (``create``) if it does not exist, narrow it if group or others have any permission."""
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, 0o600)  # exactly 0600: the umask may have cleared more
            finally:
                os.close(fd)
            return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
        log.warning(
            "%s was accessible to other users (mode %04o); it is now %04o",
            path,
            stat.S_IMODE(st.st_mode),
            stat.S_IMODE(st.st_mode) & 0o700,
        )
