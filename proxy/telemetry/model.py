"""Telemetry decisions without I/O: the ``[telemetry]`` settings, W3C trace context, what a span
may show of a request, and which GenAI operation an upstream call is.

Nothing here imports OpenTelemetry: :mod:`proxy.config` reads these settings whether or not the
``otel`` extra is installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote_plus

TRACEPARENT_PARAM = "pw_traceparent"  # the signed query parameter carrying the signer's trace context
REDACTED = "REDACTED"  # the OpenTelemetry convention for a value a URL attribute must not show
MAX_MODEL_BODY = 1 << 20  # a request body larger than this is not parsed for its model

# A JSON key "model" and its string value: unescaped quotes around a key occur only in keys.
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')
MODEL_SNIFF_BYTES = 65536  # of a streamed request body, looked at for its model (only while tracing)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """The ``[telemetry]`` section; an empty ``otlp_endpoint`` turns tracing off (the default)."""

    otlp_endpoint: str = ""  # base URL of an OTLP/HTTP receiver; spans go to <endpoint>/v1/traces
    service_name: str = "parkway"
    sample_ratio: float = 1.0  # of traces Parkway starts; a signer's pw_traceparent decides for its own
    record_user: bool = False  # the end user (server.user_param) as a span attribute

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)

    @property
    def traces_url(self) -> str:
        return self.otlp_endpoint.rstrip("/") + "/v1/traces"


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C ``traceparent``: the caller's trace id, its span id and whether it samples."""

    trace_id: int
    span_id: int
    sampled: bool

    def header(self) -> str:
        return format_traceparent(self.trace_id, self.span_id, self.sampled)


def parse_traceparent(text: str | None) -> TraceParent | None:
    """The trace context in ``text``, or None when it is absent or invalid (W3C Trace Context §3.2:
    version ff and all-zero ids are invalid; a future version may carry more fields after ours)."""
    if not text or len(text) > 512:
        return None
    match = _TRACEPARENT.fullmatch(text.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if not tid or not sid:
        return None
    return TraceParent(tid, sid, bool(int(flags, 16) & 1))


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def redacted_query(raw_query: str, hidden: Collection[str], dropped: Collection[str] = ()) -> str:
    """``raw_query`` as a span may show it: values of ``hidden`` names (lower case) replaced by
    REDACTED, ``dropped`` names left out; everything else as the client sent it."""
    if not raw_query:
        return ""
    out = []
    for pair in raw_query.split("&"):
        name, eq, _value = pair.partition("=")
        key = unquote_plus(name).lower()
        if key in dropped:
            continue
        out.append(f"{name}={REDACTED}" if key in hidden and eq else pair)
    return "&".join(out)


# The last path segment of an upstream call -> gen_ai.operation.name (OpenTelemetry GenAI conventions).
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
    ("/messages", "chat"),  # Anthropic
    (":generatecontent", "generate_content"),  # Gemini
    (":streamgeneratecontent", "generate_content"),
)

# Host suffix -> gen_ai.provider.name (the conventions' well-known values).
_PROVIDERS = (
    ("api.openai.com", "openai"),
    (".openai.azure.com", "azure.ai.openai"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.groq.com", "groq"),
    ("api.deepseek.com", "deepseek"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.perplexity.ai", "perplexity"),
)


@lru_cache(maxsize=1024)  # per request, for the GenAI metrics: a lookup instead of a scan
def operation_name(upstream_path: str) -> str | None:
    """The GenAI operation an upstream path names, or None for a call that is not one."""
    path = upstream_path.partition("?")[0].rstrip("/").lower()
    for suffix, operation in _OPERATIONS:
        if path.endswith(suffix):
            return operation
    return None


def provider_name(host: str) -> str:
    """The well-known provider for ``host``; any other upstream is named by its host."""
    host = host.lower()
    for suffix, name in _PROVIDERS:
        if host == suffix or host.endswith(suffix if suffix.startswith(".") else "." + suffix):
            return name
    return host


def model_in_prefix(data: bytes) -> str | None:
    """The ``model`` named in the first bytes of a JSON body that streams (it cannot be parsed whole)."""
    match = _MODEL_KEY.search(data, 0, MODEL_SNIFF_BYTES)
    return match[1].decode("utf-8", "replace") if match else None


def request_model(body: bytes | None) -> str | None:
    """The ``model`` a JSON request body asks for (only read while tracing; bounded)."""
    if not body or len(body) > MAX_MODEL_BODY or b'"model"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model[:128] if isinstance(model, str) else None
