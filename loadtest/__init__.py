"""Parkway's load tests: a lean upstream, a load generator and a runner (``python -m loadtest run``).

Not part of ``make test`` (too heavy); ``tests/e2e/test_loadtest_smoke.py`` runs a tiny variant.
"""
