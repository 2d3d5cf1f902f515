"""Parkway: a Trio reverse proxy for Signway-signed URLs that streams LLM answers to browsers."""

__version__ = "0.1.0"  # the one version number: setup.cfg reads it
