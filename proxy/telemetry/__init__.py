"""OpenTelemetry traces and the GenAI metrics.

:mod:`~proxy.telemetry.model` (pure) holds the settings and the decisions: W3C trace context,
what a span may show of a URL, the GenAI operation of an upstream path. Only
:mod:`~proxy.telemetry.tracing` imports OpenTelemetry, and only when ``[telemetry]`` names an
endpoint: with telemetry off no OpenTelemetry module is loaded and a request pays one ``None`` check.
"""
