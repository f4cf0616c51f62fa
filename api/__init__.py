"""Trellis control plane: the HTTP API (Flask), the store, DNS and the CLI."""

__version__ = "0.1.0"
