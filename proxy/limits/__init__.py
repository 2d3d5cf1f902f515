"""Limits: the global admission gate, per-credential and per-user rates and concurrency, single-use signatures, and where their state lives (memory or Redis)."""
