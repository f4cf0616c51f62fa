"""One error tree for the control plane, rendered once, as JSON, at the HTTP boundary.

Domain code raises these; driver, hvac and parsing exceptions are translated into them where
they happen, so that nothing a client sends can surface as a 500 with a traceback. Each class
says who is at fault: 4xx errors are the client's, 5xx errors are ours or a dependency's.
"""

from __future__ import annotations

from typing import Any


class TrellisError(Exception):
    """Base of every error Trellis reports to a client."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code, "status": self.status}


class BadRequest(TrellisError):
    """The client sent something malformed: bad JSON, a wrong type, an unknown field."""

    status = 400
    code = "bad_request"


class PermissionDenied(TrellisError):
    """The token may not do this. The message always starts with Consul's 'Permission denied'."""

    status = 403
    code = "permission_denied"

    def __init__(self, message: str = "Permission denied", **kw: Any) -> None:
        if not message.startswith("Permission denied"):
            message = f"Permission denied: {message}"
        super().__init__(message, **kw)


class NotFound(TrellisError):
    status = 404
    code = "not_found"


class MethodNotAllowed(TrellisError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(TrellisError):
    """The client did not send its whole request body within ``limits.http_body_timeout``
    (a stalled or very slow client; the connection is closed after this answer)."""

    status = 408
    code = "request_timeout"


class Conflict(TrellisError):
    status = 409
    code = "conflict"


class PayloadTooLarge(TrellisError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(TrellisError):
    status = 429
    code = "too_many_requests"


class TooManyConnections(TooManyRequests):
    """The client's address already holds ``limits.http_max_conns_per_client`` connections
    to this worker; the new one is answered and closed before any request is read."""

    code = "too_many_connections"


class StoreUnavailable(TrellisError):
    """The store (SQLite file or PostgreSQL server) cannot be reached or refused the work."""

    status = 503
    code = "store_unavailable"


class SealError(TrellisError):
    """A sealed secret of the CA (a private key, the Vault token) does not open with this
    server's CA seal key. The operator is at fault, not the client: the key is not the one the
    CA was set up with, or servers sharing one store were given different keys (or the stored
    value was damaged). The message names the secret and where this server's key came from;
    a 500 that the server logs, with that message."""

    status = 500
    code = "ca_seal_key_mismatch"


class ConfigError(Exception):
    """The operator's configuration is wrong; raised at start-up, never to an HTTP client."""
