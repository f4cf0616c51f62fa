"""The node agent (``trellis agent``): local API, health checks, managed sidecars, anti-entropy."""
