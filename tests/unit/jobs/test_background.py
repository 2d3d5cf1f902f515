"""Which verified requests become jobs (proxy.jobs.background): table-driven."""

from __future__ import annotations

import pytest

from proxy.errors import Forbidden
from proxy.jobs.background import (
    BackgroundAsk,
    background_ask,
    job_id_from_path,
    prefers_async,
    status_url_prefix,
    stored_headers,
)
from proxy.jobs.model import JobsConfig

ON = JobsConfig(enabled=True)
HOOKS = ("https://app.example.com/hooks/",)


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        ("respond-async", True),
        ("Respond-Async, wait=10", True),
        ("wait=10, respond-async", True),
        ("respond-async; foo=bar", True),
        ("return=minimal", False),
        ("respond-asynchronously", False),
        ("", False),
        (None, False),
    ],
)
def test_prefers_async(prefer: str | None, expected: bool) -> None:
    assert prefers_async(prefer) is expected


@pytest.mark.parametrize(
    ("params", "prefer", "expected"),
    [
        ({}, None, None),  # an ordinary request
        ({}, "respond-async", None),  # the URL does not allow it: the preference is ignored
        ({"pw_async": "1"}, None, None),  # allowed but not asked for: served as usual
        ({"pw_async": "1"}, "respond-async", BackgroundAsk(None)),  # poll mode
        ({"pw_async": "true"}, "respond-async", BackgroundAsk(None)),
        ({"pw_async": "0"}, "respond-async", None),
        ({"pw_callback": "https://app.example.com/hooks/parkway?x=1"}, None,
         BackgroundAsk("https://app.example.com/hooks/parkway?x=1")),
        ({"pw_callback": "HTTPS://App.Example.com:443/hooks/a"}, "respond-async",
         BackgroundAsk("https://app.example.com/hooks/a")),
    ],
)  # fmt: skip
def test_background_ask(params: dict[str, str], prefer: str | None, expected: BackgroundAsk | None) -> None:
    assert background_ask(params, prefer, ON, credential="app", allowed_callbacks=HOOKS) == expected


@pytest.mark.parametrize(
    ("params", "settings", "allowed", "code", "says"),
    [
        ({"pw_callback": "https://app.example.com/hooks/x"}, JobsConfig(), HOOKS, "jobs_disabled", "[jobs]"),
        ({"pw_async": "1"}, JobsConfig(), HOOKS, "jobs_disabled", "not enabled"),
        ({"pw_callback": "https://evil.example/hooks/"}, ON, HOOKS, "callback_not_allowed", "https://evil.example/hooks/"),
        ({"pw_callback": "https://app.example.com/hooksx"}, ON, HOOKS, "callback_not_allowed", "not within"),
        ({"pw_callback": "https://app.example.com/hooks/../admin"}, ON, HOOKS, "callback_not_allowed", "/admin"),
        ({"pw_callback": "https://app.example.com/hooks/x"}, ON, (), "callback_not_allowed", "allows no callbacks"),
        # an encoded / \\ or . that a receiver may decode past the prefix: the upstreams' rule
        ({"pw_callback": "https://app.example.com/hooks/..%2F..%2Finternal%2Fadmin"}, ON, HOOKS, "ambiguous_path", "'/'"),
        ({"pw_callback": "https://app.example.com/hooks/..%5Cadmin"}, ON, HOOKS, "ambiguous_path", "'\\\\'"),
        ({"pw_callback": "https://app.example.com/hooks/%2e%2e/admin"}, ON, HOOKS, "callback_not_allowed", "/admin"),
        ({"pw_callback": "https://app.example.com/hooks/%252F..%252Fadmin"}, ON, HOOKS, "ambiguous_path", "more than once"),
        ({"pw_callback": "ftp://app.example.com/hooks/x"}, ON, HOOKS, "callback_not_allowed", "is not a callback URL"),
    ],
)  # fmt: skip
def test_refusals(params: dict[str, str], settings: JobsConfig, allowed: tuple[str, ...], code: str, says: str) -> None:
    with pytest.raises(Forbidden) as caught:
        background_ask(params, "respond-async", settings, credential="app", allowed_callbacks=allowed)
    assert caught.value.code == code and says in caught.value.message


def test_renamed_parameters() -> None:
    settings = JobsConfig(enabled=True, callback_param="cb", async_param="bg")
    assert background_ask(
        {"bg": "1"}, "respond-async", settings, credential="a", allowed_callbacks=()
    ) == BackgroundAsk(None)
    assert background_ask({"pw_async": "1"}, "respond-async", settings, credential="a", allowed_callbacks=()) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/jobs/job_abc", "job_abc"),
        ("/ai/jobs/job_abc", "job_abc"),
        ("/jobs/", ""),
        ("/jobs", None),
        ("/", None),
        ("/v1/jobs/x", None),
        ("/aijobs/x", None),
    ],
)
def test_job_id_from_path(path: str, expected: str | None) -> None:
    assert job_id_from_path(path, ("/ai",)) == expected


def test_status_url_prefix_and_stored_headers() -> None:
    assert status_url_prefix("https://app.example.com/ai") == "https://app.example.com/ai/jobs"
    assert status_url_prefix("https://app.example.com/") == "https://app.example.com/jobs"
    forwarded = [
        (b"content-type", b"application/json"),
        (b"prefer", b"respond-async"),
        (b"accept-encoding", b"gzip"),
        (b"authorization", b"Bearer sk-injected"),
        (b"content-length", b"2"),
        (b"x-forwarded-for", b"1.2.3.4"),
    ]
    assert stored_headers(forwarded, [("Authorization", "Bearer sk-injected")]) == (
        ("content-type", "application/json"),
        ("accept-encoding", "gzip"),  # the job asks for what its client asked for
        ("x-forwarded-for", "1.2.3.4"),
    )
