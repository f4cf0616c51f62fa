"""The service's private key and its CSR, made where ``cryptography`` may be imported.

A sidecar lives as long as its service and must stay small; ``cryptography`` costs it some
9 MB of RSS (issue 10), yet the sidecar needs it only to make one P-256 key and one CSR. So
``trellis connect proxy`` has them made by a short-lived child process,
``python -m trellis.proxy.keygen``, and never imports ``cryptography`` itself; the native SDK
and the tests, which hold ``cryptography`` anyway, use ``InProcessKeys``.

The child's protocol, over pipes only:

* stdin: the SPIFFE ID the CSR names, on the first line; then, optionally, the PEM of the
  key to use (when the follower asks again for a new identity, with the key it already has);
* stdout: the key's PEM (PKCS#8), then the CSR's PEM; exit status 0;
* on bad input or any failure: one line on stderr saying why, exit status 1.

The key travels only through these pipes, in memory: it is never written to disk, never
logged (the child prints nothing but the PEMs to stdout, and its error messages never quote
its input), never sent to the server (only the CSR is). The child lives a fraction of a
second, and the parent holds the key in memory as it did when it made the key itself.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: The child imports cryptography and makes a P-256 key: well under a second unloaded.
CHILD_TIMEOUT = 30.0
_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


class KeygenError(Exception):
    """The key or the CSR could not be made: the child failed, timed out, or answered what
    is not a key and a CSR. The environment is at fault (a broken install, a starved host);
    the message says which, and never holds key material."""


@dataclass(frozen=True)
class KeyAndCSR:
    key_pem: str = field(repr=False)
    csr_pem: str


class KeySource(Protocol):
    """Makes the service's key (once) and a CSR naming ``spiffe_id`` with that key."""

    async def key_and_csr(self, spiffe_id: str, key_pem: str | None) -> KeyAndCSR: ...


def make(spiffe_id: str, key_pem: str | None = None) -> KeyAndCSR:
    """A new P-256 key (or ``key_pem``) and the CSR the sidecar sends: the one place that
    imports ``cryptography`` on the sidecar's behalf. ValueError if the ID or key is bad."""
    # Imported here, not at the top: the sidecar imports this module for ChildKeys.
    from cryptography.hazmat.primitives.serialization import Encoding

    from trellis.proxy import spiffe
    from trellis.proxy import x509 as px

    identity = spiffe.parse_service(spiffe_id)
    key = px.load_key(key_pem) if key_pem is not None else px.generate_key("ec", 256)
    csr = px.build_csr(key, identity)
    return KeyAndCSR(
        key_pem=key_pem if key_pem is not None else px.key_pem(key),
        csr_pem=csr.public_bytes(Encoding.PEM).decode(),
    )


class InProcessKeys:
    """Make the key and CSR in this process (the SDK, the tests): imports cryptography."""

    async def key_and_csr(self, spiffe_id: str, key_pem: str | None) -> KeyAndCSR:
        try:
            return make(spiffe_id, key_pem)
        except ValueError as e:
            raise KeygenError(f"cannot make the key and CSR: {e}") from None


class ChildKeys:
    """Make the key and CSR in a short-lived child process (``trellis connect proxy``)."""

    def __init__(
        self, *, command: Sequence[str] | None = None, timeout: float = CHILD_TIMEOUT
    ) -> None:
        # The same interpreter, so the child finds the same trellis and cryptography.
        self.command = list(command or (sys.executable, "-m", "trellis.proxy.keygen"))
        self.timeout = timeout

    async def key_and_csr(self, spiffe_id: str, key_pem: str | None) -> KeyAndCSR:
        import trio  # not at the top: the child (main) has no use for it

        request = spiffe_id + "\n" + (key_pem or "")
        try:
            with trio.fail_after(self.timeout):
                done = await trio.run_process(
                    self.command,
                    stdin=request.encode(),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        except trio.TooSlowError:
            raise KeygenError(
                f"the key generator ({' '.join(self.command)}) did not answer within "
                f"{self.timeout:g} s"
            ) from None
        except OSError as e:
            raise KeygenError(f"cannot run the key generator ({self.command[0]}): {e}") from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1][:300] if lines else "no message"
            raise KeygenError(f"the key generator exited with status {done.returncode}: {why}")
        try:
            return parse_answer(done.stdout.decode("ascii"))
        except (UnicodeDecodeError, KeygenError):
            raise KeygenError("the key generator's answer is not a key and a CSR") from None


def parse_answer(text: str) -> KeyAndCSR:
    """The child's stdout: a PRIVATE KEY block, then a CERTIFICATE REQUEST block."""
    blocks = [(m.group(1), m.group(0)) for m in _BLOCK.finditer(text)]
    if [kind for kind, _ in blocks] != ["PRIVATE KEY", "CERTIFICATE REQUEST"]:
        raise KeygenError("expected a PRIVATE KEY and a CERTIFICATE REQUEST")
    return KeyAndCSR(key_pem=blocks[0][1], csr_pem=blocks[1][1])


def main() -> int:
    """The child: read the request on stdin, answer on stdout (see the module docstring)."""
    spiffe_id, _, rest = sys.stdin.read().partition("\n")
    key_pem = rest if rest.strip() else None
    try:
        out = make(spiffe_id.strip(), key_pem)
    except (ValueError, TypeError) as e:
        # Never echo the input: it may hold the key. The messages of the ID parser and of
        # the key loader name the rule broken, not the data.
        print(f"trellis keygen: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(out.key_pem if out.key_pem.endswith("\n") else out.key_pem + "\n")
    sys.stdout.write(out.csr_pem)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
