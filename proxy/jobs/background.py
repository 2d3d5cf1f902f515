"""Whether a verified request runs in the background, and the small decisions around it. Pure.

A backend opts a URL in by signing extra parameters (the browser can change neither):

* ``pw_callback=<url>``: run in the background and POST the result there; the URL must start
  with one of the credential's ``allowed_callbacks`` (none configured: no callbacks);
* ``pw_async=1``: the client may ask for the background with ``Prefer: respond-async``
  (RFC 7240) and poll the status URL. Without that preference the request is served as usual,
  as RFC 7240 lets a server ignore a preference, so one signed URL serves both ways.

A ``Prefer: respond-async`` on a URL that does not allow it is ignored the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import Forbidden
from ..urls import InvalidURL, client_text, normalize_url, path_ambiguity
from .model import JobsConfig, Pairs

_TRUE = frozenset({"1", "true", "yes"})
# Not kept for the upstream call: framing and the preference itself (Parkway honours it, the
# upstream must answer normally). Accept-Encoding is kept: the job asks for what the client
# asked for, as a proxied request does (none: an identity answer, stored as text).
_NOT_STORED = frozenset({"content-length", "prefer"})


@dataclass(frozen=True, slots=True)
class BackgroundAsk:
    """A request that runs as a job: where to deliver it (None: the client polls)."""

    callback: str | None


def prefers_async(prefer: str | None) -> bool:
    """Whether a ``Prefer`` header value holds the ``respond-async`` preference (RFC 7240 §4.1)."""
    if not prefer:
        return False
    return any(p.split(";", 1)[0].strip().lower() == "respond-async" for p in prefer.split(","))


def background_ask(
    signed_params: Mapping[str, str],
    prefer: str | None,
    settings: JobsConfig,
    *,
    credential: str,
    allowed_callbacks: tuple[str, ...],
) -> BackgroundAsk | None:
    """The job a verified request asks for, or None to serve it as usual.

    Raises Forbidden when it asks for one that cannot be had: jobs off, a callback not allowed.
    """
    callback = signed_params.get(settings.callback_param)
    allows_async = signed_params.get(settings.async_param, "").lower() in _TRUE
    if callback is None and not (allows_async and prefers_async(prefer)):
        return None
    if not settings.enabled:
        raise Forbidden(
            "this URL asks for a background job, but background jobs are not enabled on this Parkway ([jobs])",
            code="jobs_disabled",
        )
    if callback is None:
        return BackgroundAsk(None)
    return BackgroundAsk(check_callback(callback, credential, allowed_callbacks))


def check_callback(url: str, credential: str, allowed_callbacks: tuple[str, ...]) -> str:
    """The callback URL, normalised as upstream URLs are, if the credential allows it."""
    if not allowed_callbacks:
        raise Forbidden(
            f"credential {credential!r} allows no callbacks: set allowed_callbacks to deliver results",
            code="callback_not_allowed",
        )
    try:
        normalised = normalize_url(url)
    except InvalidURL as exc:
        raise Forbidden(f"{url!r} is not a callback URL: {exc}", code="callback_not_allowed") from None
    # The prefix check below is only as good as the path it reads: the same rule as for upstreams.
    path = urlsplit(normalised).path
    ambiguity = path_ambiguity(path)
    if ambiguity is not None:
        raise Forbidden(
            f"callback path {client_text(path)} is refused: {ambiguity}, which a receiver may decode into "
            "another path than the one allowed",
            code="ambiguous_path",
        )
    if not any(normalised.startswith(prefix) for prefix in allowed_callbacks):
        raise Forbidden(
            f"callback {normalised.split('?', 1)[0]} is not within the allowed_callbacks of credential {credential!r}",
            code="callback_not_allowed",
        )
    return normalised


def job_id_from_path(path: str, prefixes: Iterable[str] = ()) -> str | None:
    """The ``<id>`` of ``/jobs/<id>`` (also under a public path prefix), or None for any other path."""
    for prefix in ("", *prefixes):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) :]
        if rest.startswith("/jobs/"):
            return rest[len("/jobs/") :]
    return None


def status_url_prefix(public_url: str) -> str:
    """Where clients reach the jobs from outside (``https://app.example/ai/jobs``): from the
    configured ``[jobs] public_url`` alone, never from a request's Host or X-Forwarded-* headers,
    which would let a client point a signed webhook's ``body_url`` at a host of its choosing."""
    return f"{public_url.rstrip('/')}/jobs"


def stored_headers(forwarded: Iterable[tuple[bytes, bytes]], injected: Iterable[tuple[str, str]]) -> Pairs:
    """The request headers kept with a job: what would be forwarded, minus the credential's
    injected ones (added again when it runs, so no secret is written to the store)."""
    skip = _NOT_STORED | {name.lower() for name, _ in injected}
    return tuple(
        (n.decode("latin-1"), v.decode("latin-1")) for n, v in forwarded if n.decode("latin-1").lower() not in skip
    )
