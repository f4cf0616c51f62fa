"""gunicorn's config for the Flask app in the mesh: TLS by the SDK, one Service per worker.

    gunicorn -c examples/flask-web/gunicorn.conf.py --chdir examples/flask-web app:app

Each worker makes its own ``Service("web")`` after gunicorn forks it (``post_fork``; the
follower is a thread, which does not survive a fork), serves TLS with that Service's
``server_ssl_context()`` (the ``ssl_context`` hook of gunicorn >= 21: a client certificate
from the mesh's roots is required, and renewed leaves and rotated roots apply to each new
connection with no restart), and closes it when the worker exits. The app module reaches it
with ``trellis.connect.wsgi.worker_service("web")``.

The environment sets what differs between deployments: ``TRELLIS_HTTP_ADDR`` (default
http://127.0.0.1:8500), ``TRELLIS_HTTP_TOKEN``, ``WEB_BIND`` (default 127.0.0.1:9200),
``WEB_WORKERS`` (default 2) and ``WEB_WORKER_CLASS`` (sync or gthread; default sync: the
gevent worker is refused, see trellis.connect.wsgi).
"""

import os

from trellis.connect.wsgi import WorkerService

web = WorkerService(
    "web",
    address=os.environ.get("TRELLIS_HTTP_ADDR", "http://127.0.0.1:8500"),
    token=os.environ.get("TRELLIS_HTTP_TOKEN") or None,
)

bind = os.environ.get("WEB_BIND", "127.0.0.1:9200")
workers = int(os.environ.get("WEB_WORKERS", "2"))
worker_class = os.environ.get("WEB_WORKER_CLASS", "sync")

post_fork = web.post_fork
worker_exit = web.worker_exit
ssl_context = web.ssl_context
# gunicorn serves TLS only when a certfile is set, and checks at start that the file exists;
# the ssl_context hook above replaces gunicorn's own context, so the file is never read.
certfile = __file__
