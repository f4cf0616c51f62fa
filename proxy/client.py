"""A typed client for Trellis's Consul-compatible HTTP API.

Shared by the CLI, the node agent and sidecar, and the Terraform provider, so it imports neither
Flask nor trio: it is a thin, synchronous layer over keep-alive HTTP/1.1 connections of the
standard library (``http.client``). A sidecar holds this client for its whole life: an HTTP
library would cost every sidecar some 4 MB of imports for the few requests it makes (measured,
issue 10), so the standard library it loads anyway does the work.

Theory of operation:

* Every call goes through :meth:`Client.request`, which hands the request to its transport, the
  only code that does I/O: :class:`_Pool` (``http.client`` connections, reused across requests
  and threads), or an ``httpx`` transport a caller passes in (a test over the WSGI app; httpx is
  imported only then). Their exceptions are translated there, at the boundary, into
  :class:`ConnectionFailed` (the server could not be reached or did not answer in time) and
  :class:`APIError` (it answered with an error status); nothing transport-specific escapes
  this module.
* A response is a small frozen :class:`Response` (status, body bytes, headers, the
  ``X-Consul-Index``), so callers never hold an open connection.
* Blocking (long-poll) reads send ``?index=N&wait=D``. The server may hold such a request for
  ``wait`` plus up to ``wait/16`` of jitter, so the read timeout of that one request is raised to
  cover both plus a margin; an ordinary request keeps the short default timeout.
* Methods that can block (``index=``/``wait=``) return :class:`Indexed` (the decoded value and
  the index to pass to the next call); the others return the decoded value itself.
"""

from __future__ import annotations

import base64
import http.client
import json as jsonlib
import select
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from trellis.proxy.durations import format_duration, parse_duration

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

DEFAULT_ADDRESS = "http://127.0.0.1:8500"
#: What the server waits when a blocking read names an index but no ``wait`` (Consul's 5m).
SERVER_DEFAULT_WAIT = 300.0
#: Extra read time granted to a blocking read on top of ``wait + wait/16``.
BLOCKING_MARGIN = 10.0


class APIError(Exception):
    """The server answered a request with an error status.

    ``status`` is the HTTP status: 4xx means the caller sent something wrong (or lacks the
    permission), 5xx that the server or its store failed. ``message`` is the server's own words
    (the ``error`` field of its JSON body, else its text body).
    """

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConnectionFailed(APIError):
    """No HTTP answer at all: refused, unreachable, reset, timed out or a malformed address.

    The fault is the environment's (server down, wrong address); ``status`` is None.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(None, f"cannot reach Trellis at {address}: {reason}")
        self.address = address
        self.reason = reason


@dataclass(frozen=True)
class Response:
    """One HTTP answer, read to the end."""

    status: int
    body: bytes
    #: Header names in lower case.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: ``X-Consul-Index`` as an int, or None when absent or not a number.
    index: int | None = None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; a body that is not JSON is the server's fault (APIError)."""
        try:
            return jsonlib.loads(self.body)
        except ValueError as e:
            raise APIError(self.status, f"the server sent a body that is not JSON: {e}") from None


@dataclass(frozen=True)
class Indexed(Generic[T]):
    """A value read with a blocking-capable query, and the index to block on next."""

    value: T
    index: int | None


@dataclass(frozen=True)
class KVPair:
    key: str
    value: bytes | None
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0
    session: str = ""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KVPair:
        if not isinstance(d, Mapping):
            raise APIError(200, "the server sent a K/V entry that is not an object")
        raw = d.get("Value")
        try:
            value = None if raw is None else base64.b64decode(raw, validate=True)
        except (ValueError, TypeError) as e:
            raise APIError(200, f"the server sent a K/V value that is not base64: {e}") from None
        return cls(
            key=d.get("Key", ""),
            value=value,
            flags=int(d.get("Flags") or 0),
            create_index=int(d.get("CreateIndex") or 0),
            modify_index=int(d.get("ModifyIndex") or 0),
            lock_index=int(d.get("LockIndex") or 0),
            session=d.get("Session") or "",
        )

    def to_json(self) -> dict[str, Any]:
        """The entry in the API's own shape (``Value`` base64-encoded)."""
        return {
            "Key": self.key,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "LockIndex": self.lock_index,
            "Flags": self.flags,
            "Value": None if self.value is None else base64.b64encode(self.value).decode(),
            "Session": self.session,
        }


def normalize_address(address: str) -> str:
    """``127.0.0.1:8500`` -> ``http://127.0.0.1:8500``, as Consul's clients accept both."""
    address = address.strip()
    if "://" not in address:
        address = "http://" + address
    scheme, _, rest = address.partition("://")
    return f"{scheme}://{rest.rstrip('/')}"


def _wait_seconds(wait: float | str | None) -> float | None:
    if wait is None:
        return None
    if isinstance(wait, str):
        return parse_duration(wait)
    if wait < 0:
        raise ValueError("wait must not be negative")
    return float(wait)


def _path(*parts: str) -> str:
    return "/".join(quote(p, safe="") for p in parts)


def _key_path(key: str) -> str:
    # Keys keep their slashes; everything else that is special in a URL is escaped.
    return "/v1/kv/" + quote(key.lstrip("/"), safe="/")


_KINDS: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _expect(r: Response, kind: type[T]) -> T:
    """The JSON body, which must be of ``kind``; anything else is the server's fault."""
    value = r.json()
    if not isinstance(value, kind):
        got = _KINDS.get(type(value), type(value).__name__)
        raise APIError(r.status, f"the server sent {got} where {_KINDS[kind]} was expected")
    return value


def _error_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            doc = jsonlib.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"])
    return text or f"Unexpected response code: {status}"


#: What a transport returns: status, headers (names in lower case), the whole body.
Answer = tuple[int, dict[str, str], bytes]


class _Transport(Protocol):
    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        read_timeout: float,
    ) -> Answer:
        """One request; OSError, TimeoutError or http.client.HTTPException when there is no
        answer (the boundary in ``Client.request`` turns them into ConnectionFailed)."""
        ...

    def close(self) -> None: ...


def _tls_context(verify: Any) -> ssl.SSLContext:
    """``verify`` as httpx took it: True (the system's CAs), a CA file's path, an SSLContext,
    or False (no verification; for a test server only)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if verify is True:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(verify))


class _Pool:
    """Keep-alive HTTP/1.1 connections to one server, shared by threads (the sidecar's
    follower runs several blocking reads at once, each in its own thread): a request takes an
    idle connection, or opens one, and gives it back once its answer is read to the end."""

    def __init__(self, scheme: str, host: str, port: int | None, timeout: float, verify: Any):
        self._scheme = scheme
        self._host = host
        self._port = port
        self._timeout = timeout
        self._tls = _tls_context(verify) if scheme == "https" else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _still_open(conn):
                    return conn
                conn.close()
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        read_timeout: float,
    ) -> Answer:
        conn = self._take()
        try:
            if conn.sock is None:
                conn.connect()  # bounded by the ordinary timeout
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)  # a blocking read may wait much longer
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        answer = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if resp.will_close:
            conn.close()
        else:
            self._give(conn)
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection is reusable unless the server closed it meanwhile (it
    then reads as ready: end of stream). Checked before each reuse, so that a request is
    not sent into a connection the server has already given up."""
    sock = conn.sock
    if sock is None:
        return True  # never connected: connects on use
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class _Httpx:
    """An ``httpx`` transport (``httpx.WSGITransport`` over the real app, in tests) behind the
    same interface; httpx is imported only for it."""

    def __init__(self, base_url: str, timeout: float, transport: httpx.BaseTransport) -> None:
        import httpx

        self._httpx = httpx
        self._timeout = timeout
        self._http = httpx.Client(base_url=base_url, transport=transport, follow_redirects=False)

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        read_timeout: float,
    ) -> Answer:
        hx = self._httpx
        timeout = hx.Timeout(self._timeout, read=read_timeout)
        try:
            r = self._http.request(method, target, headers=headers, content=body, timeout=timeout)
            data = r.read()
        except hx.TimeoutException as e:
            raise TimeoutError(type(e).__name__) from None
        except (hx.TransportError, hx.InvalidURL, hx.StreamError) as e:
            raise OSError(str(e) or type(e).__name__) from None
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, data

    def close(self) -> None:
        self._http.close()


class Client:
    """A connection pool to one Trellis server. Use it as a context manager, or ``close()`` it.

    ``timeout`` bounds connecting and each non-blocking request; ``verify`` is for an HTTPS
    address (True: the system's CAs; a CA file's path; an ``ssl.SSLContext``); ``transport``
    lets a caller replace the network with an httpx transport (for example
    ``httpx.WSGITransport`` over the real app).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        verify: Any = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.address = normalize_address(address)
        parts = urlsplit(self.address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectionFailed(address, "the address must look like http://HOST:PORT")
        try:
            port = parts.port
        except ValueError as e:
            raise ConnectionFailed(address, str(e)) from None
        self.token = token or None
        self.timeout = timeout
        self._prefix = parts.path.rstrip("/")
        self._headers = {"User-Agent": "trellis-client", "Accept": "*/*"}
        if self.token:
            self._headers["X-Consul-Token"] = self.token
        self._transport: _Transport
        if transport is not None:
            self._transport = _Httpx(self.address, timeout, transport)
        else:
            try:
                self._transport = _Pool(parts.scheme, parts.hostname, port, timeout, verify)
            except OSError as e:  # an unreadable CA file (ssl.SSLError is an OSError)
                raise ConnectionFailed(address, f"TLS settings: {e}") from None

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one place that does I/O -----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        index: int | None = None,
        wait: float | str | None = None,
        allow: tuple[int, ...] = (),
    ) -> Response:
        """Send one request; raise APIError for a status >= 400 that is not in ``allow``.

        ``index``/``wait`` make it a blocking read (``wait`` in seconds or as "30s").
        """
        q: dict[str, Any] = {}
        for k, v in (params or {}).items():
            if v is None or v is False:
                continue
            q[k] = "true" if v is True else v
        read = self.timeout
        wait_s = _wait_seconds(wait)
        if index is not None:
            q["index"] = int(index)
        if wait_s is not None:
            q["wait"] = format_duration(wait_s)
        if index is not None or wait_s is not None:
            blocking = SERVER_DEFAULT_WAIT if wait_s is None else wait_s
            read = max(self.timeout, blocking + blocking / 16 + BLOCKING_MARGIN)
        target = self._prefix + path
        if q:
            target += "?" + urlencode(q, doseq=True, quote_via=quote)
        headers = dict(self._headers)
        body = content
        if json is not None:
            body = jsonlib.dumps(json).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif body is None and method in ("PUT", "POST", "PATCH"):
            body = b""  # a Content-Length: 0, as servers expect of a write without a body
        try:
            status, rheaders, body = self._transport.send(method, target, headers, body, read)
        except TimeoutError as e:
            raise ConnectionFailed(self.address, f"timed out ({type(e).__name__})") from None
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionFailed(self.address, str(e) or type(e).__name__) from None
        raw_index = rheaders.get("x-consul-index")
        try:
            idx = int(raw_index) if raw_index is not None else None
        except ValueError:
            idx = None
        resp = Response(status=status, body=body, headers=rheaders, index=idx)
        if resp.status >= 400 and resp.status not in allow:
            raise APIError(resp.status, _error_message(resp.status, body))
        return resp

    # -- K/V -----------------------------------------------------------------------------------

    def kv_get(
        self,
        key: str,
        *,
        recurse: bool = False,
        keys: bool = False,
        separator: str | None = None,
        raw: bool = False,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[Any]:
        """Read K/V. The value is, by mode:

        * default: ``KVPair`` or None when the key does not exist;
        * ``recurse``: ``list[KVPair]`` under the prefix (empty when there is none);
        * ``keys``: ``list[str]`` (rolled up at ``separator`` when given);
        * ``raw``: the value's ``bytes``, or None when the key does not exist.
        """
        params: dict[str, Any] = {}
        if keys:
            params["keys"] = True
            if separator:
                params["separator"] = separator
        elif recurse:
            params["recurse"] = True
        elif raw:
            params["raw"] = True
        r = self.request("GET", _key_path(key), params=params, index=index, wait=wait, allow=(404,))
        if r.status == 404:
            return Indexed([] if (keys or recurse) else None, r.index)
        if keys:
            return Indexed([str(k) for k in _expect(r, list)], r.index)
        if raw:
            return Indexed(r.body, r.index)
        pairs = [KVPair.from_json(d) for d in _expect(r, list)]
        if recurse:
            return Indexed(pairs, r.index)
        return Indexed(pairs[0] if pairs else None, r.index)

    def kv_put(
        self, key: str, value: bytes | str, *, flags: int | None = None, cas: int | None = None
    ) -> bool:
        """Write a key; False when a ``cas`` condition did not hold (``cas=0``: create only)."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        params = {"flags": flags, "cas": cas}
        return self.request("PUT", _key_path(key), params=params, content=value).json() is True

    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """Delete a key (or a prefix); False when a ``cas`` condition did not hold."""
        r = self.request("DELETE", _key_path(key), params={"recurse": recurse, "cas": cas})
        return r.json() is True

    # -- agent ---------------------------------------------------------------------------------

    def agent_service_register(
        self, body: Mapping[str, Any], *, replace_existing_checks: bool = False
    ) -> None:
        """Register a service on the agent; ``body`` in the API (PascalCase) or file form."""
        params = {"replace-existing-checks": replace_existing_checks}
        self.request("PUT", "/v1/agent/service/register", params=params, json=dict(body))

    def agent_service_deregister(self, service_id: str) -> None:
        self.request("PUT", "/v1/agent/service/deregister/" + _path(service_id))

    def agent_services(self) -> dict[str, Any]:
        return _expect(self.request("GET", "/v1/agent/services"), dict)

    def agent_services_blocking(
        self, *, hash: str | None = None, wait: float | str | None = None
    ) -> tuple[dict[str, Any], str | None]:
        """``/v1/agent/services`` as a hash-blocking read: returns the services and the
        content hash to pass back (the answer comes when it differs, or after ``wait``)."""
        params = {"hash": hash} if hash else None
        r = self.request("GET", "/v1/agent/services", params=params, wait=wait if hash else None)
        return _expect(r, dict), r.headers.get("x-consul-contenthash")

    def agent_self(self) -> dict[str, Any]:
        return _expect(self.request("GET", "/v1/agent/self"), dict)

    # -- catalog and health --------------------------------------------------------------------

    def catalog_services(
        self, *, index: int | None = None, wait: float | str | None = None
    ) -> Indexed[dict[str, list[str]]]:
        r = self.request("GET", "/v1/catalog/services", index=index, wait=wait)
        return Indexed(_expect(r, dict), r.index)

    def catalog_nodes(
        self, *, index: int | None = None, wait: float | str | None = None
    ) -> Indexed[list[dict[str, Any]]]:
        r = self.request("GET", "/v1/catalog/nodes", index=index, wait=wait)
        return Indexed(_expect(r, list), r.index)

    def catalog_service(
        self,
        name: str,
        tag: str | None = None,
        *,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[list[dict[str, Any]]]:
        r = self.request(
            "GET",
            "/v1/catalog/service/" + _path(name),
            params={"tag": tag},
            index=index,
            wait=wait,
        )
        return Indexed(_expect(r, list), r.index)

    def catalog_node(
        self, name: str, *, index: int | None = None, wait: float | str | None = None
    ) -> Indexed[dict[str, Any] | None]:
        """The node and its services; None when there is no such node (Consul answers 200 with
        ``null``; a 404 is taken the same way)."""
        r = self.request(
            "GET", "/v1/catalog/node/" + _path(name), index=index, wait=wait, allow=(404,)
        )
        if r.status == 404 or r.json() is None:
            return Indexed(None, r.index)
        return Indexed(_expect(r, dict), r.index)

    def catalog_register(self, body: Mapping[str, Any]) -> None:
        """``PUT /v1/catalog/register``: a node and at most one service, with checks."""
        self.request("PUT", "/v1/catalog/register", json=dict(body))

    def catalog_deregister(
        self, node: str, *, service_id: str | None = None, check_id: str | None = None
    ) -> None:
        """``PUT /v1/catalog/deregister``: one service or check of ``node`` (the node itself
        when neither is given)."""
        body: dict[str, Any] = {"Node": node}
        if service_id is not None:
            body["ServiceID"] = service_id
        if check_id is not None:
            body["CheckID"] = check_id
        self.request("PUT", "/v1/catalog/deregister", json=body)

    def health_node(self, name: str) -> list[dict[str, Any]]:
        """The checks of node ``name`` (its own and its services')."""
        return _expect(self.request("GET", "/v1/health/node/" + _path(name)), list)

    def health_service(
        self,
        name: str,
        passing: bool = False,
        tag: str | None = None,
        *,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[list[dict[str, Any]]]:
        return self._health("service", name, {"passing": passing, "tag": tag}, index, wait)

    def health_connect(
        self,
        name: str,
        passing: bool = False,
        *,
        datacenter: str | None = None,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[list[dict[str, Any]]]:
        """The Connect-capable instances of ``name`` (its proxies, or itself if native), in
        ``/v1/health/service`` form: what a proxy dials for an upstream."""
        return self._health("connect", name, {"passing": passing, "dc": datacenter}, index, wait)

    def _health(
        self,
        kind: str,
        name: str,
        params: dict[str, Any],
        index: int | None,
        wait: float | str | None,
    ) -> Indexed[list[dict[str, Any]]]:
        r = self.request(
            "GET", f"/v1/health/{kind}/" + _path(name), params=params, index=index, wait=wait
        )
        return Indexed(_expect(r, list), r.index)

    def datacenters(self) -> list[str]:
        """The known datacenters, this one first."""
        return [str(d) for d in _expect(self.request("GET", "/v1/catalog/datacenters"), list)]

    def datacenter(self) -> str:
        """This cluster's datacenter."""
        dcs = self.datacenters()
        if not dcs:
            raise APIError(None, "the server reports no datacenter")
        return dcs[0]

    # -- Connect CA ----------------------------------------------------------------------------

    def ca_roots(
        self, *, index: int | None = None, wait: float | str | None = None
    ) -> Indexed[dict[str, Any]]:
        """The trusted roots (``ActiveRootID``, ``TrustDomain``, ``Sequence``, ``Roots``)."""
        r = self.request("GET", "/v1/connect/ca/roots", index=index, wait=wait)
        return Indexed(_expect(r, dict), r.index)

    def ca_roots_pem(self) -> str:
        """The trusted roots' certificates as one PEM bundle."""
        return self.request("GET", "/v1/connect/ca/roots", params={"pem": True}).text

    def ca_get_config(self) -> dict[str, Any]:
        """The CA provider and its configuration (secrets are never returned)."""
        return _expect(self.request("GET", "/v1/connect/ca/configuration"), dict)

    def ca_set_config(self, body: Mapping[str, Any]) -> None:
        """Replace the CA configuration (``Provider``, ``Config``, ``ForceWithoutCrossSigning``);
        a change of the root key rotates the root."""
        self.request("PUT", "/v1/connect/ca/configuration", json=dict(body))

    def ca_rotate(self, *, force_without_cross_signing: bool = False) -> dict[str, Any]:
        """Make a new active root; returns the roots after the rotation."""
        body = {"ForceWithoutCrossSigning": True} if force_without_cross_signing else {}
        return _expect(self.request("POST", "/v1/connect/ca/rotate", json=body), dict)

    def ca_sign(self, csr_pem: str) -> dict[str, Any]:
        """Have the CA sign a CSR; returns the ``IssuedCert`` (``CertPEM``: leaf, then chain)."""
        return _expect(self.request("POST", "/v1/connect/ca/sign", json={"CSR": csr_pem}), dict)

    # -- intentions ----------------------------------------------------------------------------

    @staticmethod
    def _intention_body(
        action: str, description: str, meta: Mapping[str, str] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"SourceType": "consul", "Action": action}
        if description:
            body["Description"] = description
        if meta:
            body["Meta"] = dict(meta)
        return body

    def intention_create(
        self,
        source: str,
        destination: str,
        action: str = "allow",
        *,
        description: str = "",
        meta: Mapping[str, str] | None = None,
    ) -> str:
        """Create the intention ``source => destination``; returns its ID. APIError 409 when
        that pair has an intention already."""
        body = {
            "SourceName": source,
            "DestinationName": destination,
            **self._intention_body(action, description, meta),
        }
        out = _expect(self.request("POST", "/v1/connect/intentions", json=body), dict)
        return str(out.get("ID", ""))

    def intention_update(
        self,
        intention_id: str,
        source: str,
        destination: str,
        action: str,
        *,
        description: str = "",
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Replace the intention with this ID (its pair may change; 409 if the new pair is
        another intention's)."""
        body = {
            "SourceName": source,
            "DestinationName": destination,
            **self._intention_body(action, description, meta),
        }
        self.request("PUT", "/v1/connect/intentions/" + _path(intention_id), json=body)

    def intention_upsert_exact(
        self,
        source: str,
        destination: str,
        action: str,
        *,
        description: str = "",
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Create or replace the intention for ``source => destination`` (by name)."""
        self.request(
            "PUT",
            "/v1/connect/intentions/exact",
            params={"source": source, "destination": destination},
            json=self._intention_body(action, description, meta),
        )

    def intention_get(self, intention_id: str) -> dict[str, Any] | None:
        """The intention with this ID, or None when there is none (APIError 400 for an ID
        that is not a UUID)."""
        r = self.request("GET", "/v1/connect/intentions/" + _path(intention_id), allow=(404,))
        return None if r.status == 404 else _expect(r, dict)

    def intention_get_exact(
        self,
        source: str,
        destination: str,
        *,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[dict[str, Any] | None]:
        """The intention for exactly this pair (``*`` taken literally), or None."""
        r = self.request(
            "GET",
            "/v1/connect/intentions/exact",
            params={"source": source, "destination": destination},
            index=index,
            wait=wait,
            allow=(404,),
        )
        return Indexed(None if r.status == 404 else _expect(r, dict), r.index)

    def intention_delete(self, intention_id: str) -> None:
        """Delete by ID; APIError 404 when there is no such intention."""
        self.request("DELETE", "/v1/connect/intentions/" + _path(intention_id))

    def intention_delete_exact(self, source: str, destination: str) -> None:
        """Delete the intention for this pair (nothing to delete is not an error)."""
        self.request(
            "DELETE",
            "/v1/connect/intentions/exact",
            params={"source": source, "destination": destination},
        )

    def intentions_list(
        self, *, index: int | None = None, wait: float | str | None = None
    ) -> Indexed[list[dict[str, Any]]]:
        """Every intention, highest precedence first."""
        r = self.request("GET", "/v1/connect/intentions", index=index, wait=wait)
        return Indexed(_expect(r, list), r.index)

    def intention_match(
        self,
        by: str,
        names: str | list[str] | tuple[str, ...],
        *,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[dict[str, list[dict[str, Any]]]]:
        """For each name, the intentions that apply to it as a ``by`` (``"source"`` or
        ``"destination"``), in evaluation order."""
        names = [names] if isinstance(names, str) else list(names)
        r = self.request(
            "GET",
            "/v1/connect/intentions/match",
            params={"by": by, "name": names},
            index=index,
            wait=wait,
        )
        return Indexed(_expect(r, dict), r.index)

    def intention_match_with_default(
        self,
        by: str,
        names: str | list[str] | tuple[str, ...],
        *,
        index: int | None = None,
        wait: float | str | None = None,
    ) -> Indexed[tuple[dict[str, list[dict[str, Any]]], bool]]:
        """``intention_match``, with the decision the server takes when no intention matches
        (``X-Trellis-Intention-Default``: allow or deny), which a proxy must apply the same way.
        APIError if the server does not say (an older server, or not Trellis)."""
        names = [names] if isinstance(names, str) else list(names)
        r = self.request(
            "GET",
            "/v1/connect/intentions/match",
            params={"by": by, "name": names},
            index=index,
            wait=wait,
        )
        default = r.headers.get("x-trellis-intention-default")
        if default not in ("allow", "deny"):
            raise APIError(r.status, "the server did not say its default intention decision")
        return Indexed((_expect(r, dict), default == "allow"), r.index)

    def intention_check(self, source: str, destination: str) -> bool:
        """Would a connection from ``source`` to ``destination`` be allowed?"""
        r = self.request(
            "GET",
            "/v1/connect/intentions/check",
            params={"source": source, "destination": destination},
        )
        return _expect(r, dict).get("Allowed") is True

    def agent_authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str = ""
    ) -> dict[str, Any]:
        """May the holder of a (verified) client certificate connect to ``target``?
        Returns ``{"Authorized": bool, "Reason": str}``."""
        body = {"Target": target, "ClientCertURI": client_cert_uri}
        if client_cert_serial:
            body["ClientCertSerial"] = client_cert_serial
        return _expect(self.request("POST", "/v1/agent/connect/authorize", json=body), dict)

    # -- ACLs ----------------------------------------------------------------------------------
    #
    # Tokens and policies in the API's own shape (dicts with Consul's field names). A token's
    # ``SecretID`` is in the answer of ``acl_bootstrap`` and ``acl_token_create`` only: the
    # server keeps a hash of it, so no read can return it.

    def acl_bootstrap(self) -> dict[str, Any]:
        """Make the first management token (once per cluster; APIError 403 after that)."""
        return _expect(self.request("PUT", "/v1/acl/bootstrap"), dict)

    @staticmethod
    def _policy_links(
        policy_ids: tuple[str, ...] | list[str] = (),
        policy_names: tuple[str, ...] | list[str] = (),
    ) -> list[dict[str, str]]:
        return [{"ID": p} for p in policy_ids] + [{"Name": n} for n in policy_names]

    def acl_token_create(
        self,
        *,
        description: str = "",
        policy_ids: tuple[str, ...] | list[str] = (),
        policy_names: tuple[str, ...] | list[str] = (),
        local: bool = False,
        accessor_id: str | None = None,
        secret_id: str | None = None,
    ) -> dict[str, Any]:
        """Create a token holding the policies named by ID or name; the answer has its
        ``SecretID`` (the only time it is shown)."""
        body: dict[str, Any] = {
            "Description": description,
            "Policies": self._policy_links(policy_ids, policy_names),
            "Local": local,
        }
        if accessor_id:
            body["AccessorID"] = accessor_id
        if secret_id:
            body["SecretID"] = secret_id
        return _expect(self.request("PUT", "/v1/acl/token", json=body), dict)

    def acl_token_read(self, accessor_id: str) -> dict[str, Any]:
        """A token by accessor ID (APIError 404 when there is none)."""
        return _expect(self.request("GET", "/v1/acl/token/" + _path(accessor_id)), dict)

    def acl_token_self(self) -> dict[str, Any]:
        """The token this client sends (the anonymous token when it sends none)."""
        return _expect(self.request("GET", "/v1/acl/token/self"), dict)

    def acl_token_update(
        self,
        accessor_id: str,
        *,
        description: str = "",
        policies: list[Mapping[str, str]] | tuple[Mapping[str, str], ...] = (),
        local: bool = False,
        keep: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Replace a token's description, policies (``{"ID": ...}`` or ``{"Name": ...}``)
        and locality; its secret never changes. ``keep``: more of the token's fields to send
        as they are (its ``Roles`` and identities, as a read returned them), since the body is
        the token's whole new state."""
        body = {
            **(keep or {}),
            "AccessorID": accessor_id,
            "Description": description,
            "Policies": [dict(p) for p in policies],
            "Local": local,
        }
        return _expect(self.request("PUT", "/v1/acl/token/" + _path(accessor_id), json=body), dict)

    def acl_token_delete(self, accessor_id: str) -> None:
        """Delete a token (APIError 404 when there is none)."""
        self.request("DELETE", "/v1/acl/token/" + _path(accessor_id))

    def acl_token_list(self) -> list[dict[str, Any]]:
        """Every token, oldest first, without secrets."""
        return _expect(self.request("GET", "/v1/acl/tokens"), list)

    def acl_policy_create(
        self,
        name: str,
        *,
        rules: str = "",
        description: str = "",
        datacenters: tuple[str, ...] | list[str] = (),
    ) -> dict[str, Any]:
        """Create a policy (``rules`` in Consul's HCL or JSON; APIError 400 when they do not
        parse, 409 when the name is taken)."""
        body = {
            "Name": name,
            "Description": description,
            "Rules": rules,
            "Datacenters": list(datacenters),
        }
        return _expect(self.request("PUT", "/v1/acl/policy", json=body), dict)

    def acl_policy_read(self, policy_id: str) -> dict[str, Any]:
        """A policy by ID, with its rules (APIError 404 when there is none)."""
        return _expect(self.request("GET", "/v1/acl/policy/" + _path(policy_id)), dict)

    def acl_policy_read_by_name(self, name: str) -> dict[str, Any]:
        """A policy by name, with its rules (APIError 404 when there is none)."""
        return _expect(self.request("GET", "/v1/acl/policy/name/" + _path(name)), dict)

    def acl_policy_update(
        self,
        policy_id: str,
        name: str,
        *,
        rules: str = "",
        description: str = "",
        datacenters: tuple[str, ...] | list[str] = (),
    ) -> dict[str, Any]:
        """Replace a policy's name, rules, description and datacenters."""
        body = {
            "ID": policy_id,
            "Name": name,
            "Description": description,
            "Rules": rules,
            "Datacenters": list(datacenters),
        }
        return _expect(self.request("PUT", "/v1/acl/policy/" + _path(policy_id), json=body), dict)

    def acl_policy_delete(self, policy_id: str) -> None:
        """Delete a policy (APIError 404 when there is none)."""
        self.request("DELETE", "/v1/acl/policy/" + _path(policy_id))

    def acl_policy_list(self) -> list[dict[str, Any]]:
        """Every policy, by name, without rules."""
        return _expect(self.request("GET", "/v1/acl/policies"), list)

    # -- status --------------------------------------------------------------------------------

    def status_leader(self) -> str:
        return _expect(self.request("GET", "/v1/status/leader"), str)

    def status_peers(self) -> list[str]:
        return _expect(self.request("GET", "/v1/status/peers"), list)
