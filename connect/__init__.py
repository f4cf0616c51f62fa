"""Trellis Connect inside your own process: the native Python SDK.

A ``Service`` holds a mesh identity (its key, made here and never sent; its leaf certificate;
the trusted roots; the intentions naming it), kept current by the same follower that runs in
every sidecar (``trellis.proxy.follower``), and uses it both ways:

* serving: ``Service.server_ssl_context()`` for any server that takes an ``ssl.SSLContext``
  (mutual TLS, the current leaf and roots for every new connection),
  ``Service.authorize(peer)`` for the intention decision on a connected peer, and
  ``Service.serve_connect(handler, port)``, a trio server that does both;
* calling: ``Service.connect("db")`` (a socket), ``await Service.connect_async("db")``
  (asyncio streams), ``await Service.connect_trio("db")`` (a trio stream), each a verified
  mutual-TLS connection to a healthy instance of ``db`` whose whole SPIFFE ID was checked,
  and ``Service.httpx_transport()`` for ``httpx`` clients calling ``http://db/...``.

Ready-made adapters for web servers, each answering 403 before the app runs to a peer the
intentions do not allow: ``trellis.connect.wsgi`` (``ConnectMiddleware``, and
``WorkerService``, gunicorn's hooks for one ``Service`` per worker, made after the fork) and
``trellis.connect.asgi`` (``ConnectMiddleware``, from the ASGI TLS extension).

Sync and asyncio code use ``Service`` directly: it runs the follower in a background thread.
trio code uses ``open_service``, which runs it as a task of the caller's trio run.

Importing this package costs no Flask, gunicorn, marshmallow or ``cryptography``: only trio
and modules of ``trellis.proxy`` (httpx comes with the first ``httpx_transport()``).
"""

from __future__ import annotations

from trellis.connect._service import ConnectError, Service, open_service
from trellis.proxy.authz import Decision, Outcome

__all__ = ["ConnectError", "Decision", "Outcome", "Service", "open_service"]
