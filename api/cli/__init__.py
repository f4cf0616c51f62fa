"""The ``trellis`` command line: client commands over the HTTP API, and ``dev``/``server``.

``trellis.api.cli.main`` dispatches; ``trellis.api.cli.base`` holds the flag parsing and output
helpers; each other module registers one family of commands. The client commands import neither
Flask nor gunicorn; ``dev`` and ``server`` import ``trellis.api.server`` only when they run.
"""
