"""Trellis data plane, and the pure modules that the control plane shares with it.

Nothing in this package imports Flask.
"""
