"""The ``trellis`` command line: client commands over the HTTP API, and ``dev``/``server``.

``api.cli.main`` dispatches; ``api.cli.base`` holds the flag parsing and output helpers; each
other module registers one family of commands. The client commands import neither Flask nor
gunicorn; ``dev`` and ``server`` import ``api.server`` only when they run.
"""
