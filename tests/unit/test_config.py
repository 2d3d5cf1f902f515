"""Tests for proxy.config: defaults, the shipped example, and every refusal with its key path."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from proxy.cache.policy import CacheConfig, CacheRules
from proxy.config import (
    AdminConfig,
    Config,
    CorsConfig,
    Credential,
    LogConfig,
    ServerConfig,
    StateConfig,
    config_from_dict,
    expand_env,
    load_config,
    parse_config,
)
from proxy.errors import ConfigError, ConfigProblem
from proxy.jobs.model import JobsConfig
from proxy.telemetry.model import TelemetryConfig
from proxy.websocket.policy import WebSocketConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "parkway.toml"

SECRET = "s3cr3t-signing-key"
API_KEY = "sk-live-abcdef123456"
ENV = {"APP_SECRET": SECRET, "API_KEY": API_KEY, "EMPTY": ""}

# A valid credential that problem cases extend or sit next to.
CRED = '[[credentials]]\nid = "app"\nsecret_env = "APP_SECRET"\n'
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks spec's example secret
HOOK = f'webhook_secret = "{WHSEC}"\n'


def problems_of(text: str, env: dict[str, str] = ENV) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env)
    return info.value.problems


# --- what a valid file gives ------------------------------------------------------------------


def test_empty_file_gives_the_defaults():
    config = parse_config("", {})
    # A file gets the admin listener on loopback; a Config built in code has none.
    assert config.admin == AdminConfig() and AdminConfig().listen == ("127.0.0.1:9180",)
    assert Config().admin.listen == ()
    assert config == dataclasses.replace(Config(), admin=AdminConfig())
    assert config_from_dict({}, {}) == config
    assert config.server.listen == ("127.0.0.1:3000",)
    assert config.server.request_timeout == 900.0
    assert config.server.max_expiry == 604800
    assert config.credentials == ()
    assert config.cors.allow_origins == ("*",)
    assert config.cors.allow_credentials is False
    assert (config.log.level, config.log.format) == ("info", "json")


FULL = """
[server]
listen = ["0.0.0.0:8080", "[::1]:8081"]
header_read_timeout = 5
keepalive_timeout = 30.5
client_body_timeout = 7
client_write_timeout = 8
upstream_connect_timeout = 3
upstream_first_byte_timeout = 60
upstream_idle_timeout = 45
request_timeout = 0
max_header_bytes = 8192
max_signed_body_bytes = 4096
max_connections = 500
drain_timeout = 0
clock_skew = 0
max_expiry = 3600

[[credentials]]
id = "app"
secret = ["inline-one", "inline-two"]
secret_env = ["APP_SECRET"]
allowed_upstreams = ["HTTPS://API.OpenAI.com/v1/", "https://api.example.com"]
[credentials.headers]
Authorization = "Bearer ${API_KEY}"
X-Literal = "cost $${not_a_var} $5"

[[credentials]]
id = "other"
secret = "x"

[cors]
allow_origins = ["https://App.Example.com", "http://localhost:5173"]
allow_methods = ["get", "Post"]
allow_headers = ["authorization", "content-type"]
expose_headers = ["x-request-id"]
max_age = 0
allow_credentials = true

[log]
level = "DEBUG"
format = "Console"
"""


def test_full_example():
    config = parse_config(FULL, ENV)
    assert config.server == ServerConfig(
        listen=("0.0.0.0:8080", "[::1]:8081"),
        header_read_timeout=5.0,
        keepalive_timeout=30.5,
        client_body_timeout=7.0,
        client_write_timeout=8.0,
        upstream_connect_timeout=3.0,
        upstream_first_byte_timeout=60.0,
        upstream_idle_timeout=45.0,
        request_timeout=0.0,
        max_header_bytes=8192,
        max_signed_body_bytes=4096,
        max_connections=500,
        drain_timeout=0.0,
        clock_skew=0.0,
        max_expiry=3600,
    )
    assert isinstance(config.server.header_read_timeout, float)
    app, other = config.credentials
    assert app == Credential(
        id="app",
        secrets=("inline-one", "inline-two", SECRET),
        headers=(("Authorization", f"Bearer {API_KEY}"), ("X-Literal", "cost ${not_a_var} $5")),
        allowed_upstreams=("https://api.openai.com/v1/", "https://api.example.com/"),
    )
    assert other == Credential(id="other", secrets=("x",))
    assert config.cors == CorsConfig(
        allow_origins=("https://app.example.com", "http://localhost:5173"),
        allow_methods=("GET", "POST"),
        allow_headers=("authorization", "content-type"),
        expose_headers=("x-request-id",),
        max_age=0,
        allow_credentials=True,
    )
    assert config.log == LogConfig(level="debug", format="console")


def test_listen_accepts_a_single_string():
    assert parse_config('[server]\nlisten = "[::]:443"', {}).server.listen == ("[::]:443",)


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("https://API.OpenAI.com/v1/", "https://api.openai.com/v1/"),
        ("https://api.example.com", "https://api.example.com/"),  # cannot match api.example.com.evil
        ("https://api.example.com:443/v1/", "https://api.example.com/v1/"),  # as requests are normalised
        ("http://10.0.0.2:8080/v1?x=1", "http://10.0.0.2:8080/v1?x=1"),
        # WebSocket prefixes are kept in the http(s) form WebSocket URLs are matched in
        ("wss://API.OpenAI.com/v1/realtime", "https://api.openai.com/v1/realtime"),
        ("ws://127.0.0.1:8080", "http://127.0.0.1:8080/"),
    ],
)
def test_allowed_upstreams_are_normalised(written, stored):
    config = parse_config(f'{CRED}allowed_upstreams = ["{written}"]', ENV)
    assert config.credentials[0].allowed_upstreams == (stored,)


def test_shipped_example_parses_with_its_variables():
    env = {"PARKWAY_MY_APP_SECRET": SECRET, "OPENAI_API_KEY": API_KEY}
    config = load_config(EXAMPLE, env)
    # The example states that its [server], [cors] (but allow_origins) and [log] values are the defaults.
    assert config.server == ServerConfig()
    assert config.cors == dataclasses.replace(CorsConfig(), allow_origins=("https://app.example.com",))
    assert config.log == LogConfig()
    assert config.websocket == WebSocketConfig()
    assert config.credentials == (
        Credential(
            id="my-app",
            secrets=(SECRET,),
            headers=(("Authorization", f"Bearer {API_KEY}"),),
            allowed_upstreams=("https://api.openai.com/v1/",),
        ),
    )


def test_shipped_example_documents_every_key():
    text = EXAMPLE.read_text()
    classes = (
        ServerConfig,
        CorsConfig,
        LogConfig,
        AdminConfig,
        StateConfig,
        WebSocketConfig,
        Credential,
        JobsConfig,
        CacheConfig,
        CacheRules,
        TelemetryConfig,
    )
    not_keys = ("secrets", "headers", "webhook_secrets", "cache")
    # A field computed from the others (init=False: Credential.budgeted) is no key.
    keys = [f.name for cls in classes for f in dataclasses.fields(cls) if f.name not in not_keys and f.init]
    keys += ["secret", "secret_env", "webhook_secret", "webhook_secret_env", r"\[credentials\.headers\]", r"\[jobs\]"]
    keys += [r"\[credentials\.cache\]", r"\[telemetry\]"]
    for key in keys:
        # Written as a setting, possibly commented out, with a comment line right above it.
        assert re.search(rf"^#[^\n]*\n(#[^\n]*\n)*#?\s*{key}(?!\w)", text, re.M), key


# --- refusals: exactly one problem, at exactly this path --------------------------------------

JOBS = '[jobs]\npublic_url = "https://p.example"\n'
PROBLEMS = [
    # top level
    (
        "extra = 1",
        "extra",
        "unknown key 'extra'; allowed keys: server, credentials, cors, log, admin, state, websocket, jobs, cache, "
        "budgets, telemetry",
    ),
    # websocket
    ("[websocket]\nmax_message_size = 100", "websocket.max_message_size", "must be at least 1024"),
    ("[websocket]\nmax_message_size = 1.5e6", "websocket.max_message_size", "expected an integer, got float"),
    ("[websocket]\nmessage_queue_size = 0", "websocket.message_queue_size", "must be at least 1"),
    ("[websocket]\nidle_timeout = -1", "websocket.idle_timeout", "must be at least 0"),
    ("[websocket]\nhandshake_timeout = 0", "websocket.handshake_timeout", "must be greater than 0"),
    ("[websocket]\nclose_timout = 1", "websocket.close_timout", "unknown key 'close_timout'"),
    ("server = 3", "server", "expected a table, got integer"),
    ("credentials = 1", "credentials", "expected an array of tables"),
    ("credentials = [1]", "credentials[0]", "expected a table, got integer"),
    # server
    ("[server]\nlisten_on = 1", "server.listen_on", "unknown key 'listen_on'; did you mean 'listen'?"),
    ("[server]\nlisten = []", "server.listen", "must not be empty"),
    ('[server]\nlisten = ["localhost"]', "server.listen[0]", "is not host:port"),
    ('[server]\nlisten = ["a:1", "127.0.0.1:70000"]', "server.listen[1]", "port must be a number from 0 to 65535"),
    ('[server]\nlisten = ["127.0.0.1:-1"]', "server.listen[0]", "port must be a number"),
    ('[server]\nlisten = [":3000"]', "server.listen[0]", "empty host"),
    ('[server]\nlisten = ["[]:3000"]', "server.listen[0]", "not an IPv6 address"),
    ('[server]\nlisten = ["::1:3000"]', "server.listen[0]", "in brackets"),
    ('[server]\nlisten = ["[example.com]:3000"]', "server.listen[0]", "not an IPv6 address"),
    ('[server]\nlisten = "127.0.0.1:http"', "server.listen", "port must be a number"),
    ("[server]\nlisten = [3000]", "server.listen[0]", "expected a string, got integer"),
    ("[server]\nheader_read_timeout = 0", "server.header_read_timeout", "must be greater than 0"),
    ("[server]\nkeepalive_timeout = -1", "server.keepalive_timeout", "must be greater than 0"),
    ("[server]\nclient_body_timeout = 0.0", "server.client_body_timeout", "must be greater than 0"),
    ("[server]\nclient_write_timeout = true", "server.client_write_timeout", "expected a number, got boolean"),
    ("[server]\nupstream_connect_timeout = inf", "server.upstream_connect_timeout", "must be a finite number"),
    ("[server]\nupstream_first_byte_timeout = nan", "server.upstream_first_byte_timeout", "finite"),
    ('[server]\nupstream_idle_timeout = "10"', "server.upstream_idle_timeout", "expected a number, got string"),
    ("[server]\nrequest_timeout = -1", "server.request_timeout", "must be at least 0"),
    ("[server]\ndrain_timeout = -0.5", "server.drain_timeout", "must be at least 0"),
    ("[server]\nclock_skew = -1", "server.clock_skew", "must be at least 0"),
    ("[server]\nmax_header_bytes = 0", "server.max_header_bytes", "must be at least 1"),
    ("[server]\nmax_signed_body_bytes = -5", "server.max_signed_body_bytes", "must be at least 1"),
    ("[server]\nmax_connections = 1.5", "server.max_connections", "expected an integer, got float"),
    ("[server]\nmax_expiry = true", "server.max_expiry", "expected an integer, got boolean"),
    # credentials
    ('[[credentials]]\nsecret_env = "APP_SECRET"', "credentials[0].id", "is required"),
    ('[[credentials]]\nid = ""\nsecret = "x"', "credentials[0].id", "must not be empty"),
    ('[[credentials]]\nid = 7\nsecret = "x"', "credentials[0].id", "expected a string, got integer"),
    ('[[credentials]]\nid = "a/b"\nsecret = "x"', "credentials[0].id", "must not contain '/'"),
    (CRED + CRED, "credentials[1].id", "duplicate id 'app', first used at credentials[0].id"),
    ('[[credentials]]\nid = "app"', "credentials[0]", "needs at least one secret"),
    ('[[credentials]]\nid = "app"\nsecret = []\nsecret_env = []', "credentials[0]", "needs at least one secret"),
    ('[[credentials]]\nid = "app"\nsecret = ""', "credentials[0].secret", "must not be empty"),
    ('[[credentials]]\nid = "app"\nsecret = ["ok", ""]', "credentials[0].secret[1]", "must not be empty"),
    ('[[credentials]]\nid = "app"\nsecret = 5', "credentials[0].secret", "expected a string, got integer"),
    ('[[credentials]]\nid = "app"\nsecret_env = "NOPE"', "credentials[0].secret_env", "variable NOPE is not set"),
    (
        '[[credentials]]\nid = "app"\nsecret_env = "EMPTY"',
        "credentials[0].secret_env",
        "variable EMPTY is not set or is empty",
    ),
    ('[[credentials]]\nid = "a"\nsecret_env = ["APP_SECRET", "NOPE"]', "credentials[0].secret_env[1]", "NOPE"),
    ('[[credentials]]\nid = "app"\nsecret_env = ""', "credentials[0].secret_env", "must name an environment variable"),
    (CRED + 'secrets = ["x"]', "credentials[0].secrets", "unknown key 'secrets'; did you mean 'secret'?"),
    (CRED + CRED.replace('"app"', '"b"') + "header = 1", "credentials[1].header", "unknown key 'header'"),
    # headers
    (CRED + 'headers = "Authorization: x"', "credentials[0].headers", "expected a table, got string"),
    (
        CRED + '[credentials.headers]\n"Bad Header" = "x"',
        'credentials[0].headers."Bad Header"',
        "not a valid header name",
    ),
    (CRED + '[credentials.headers]\n"X-Ä" = "x"', 'credentials[0].headers."X-Ä"', "not a valid header name"),
    (CRED + "[credentials.headers]\nX-Num = 1", "credentials[0].headers.X-Num", "expected a string, got integer"),
    (CRED + '[credentials.headers]\nX-A = "a\\r\\nX-Evil: 1"', "credentials[0].headers.X-A", "no CR, LF, NUL"),
    (CRED + '[credentials.headers]\nX-A = "a\\nb"', "credentials[0].headers.X-A", "no CR, LF, NUL"),
    (CRED + '[credentials.headers]\nX-A = "a\\u0000b"', "credentials[0].headers.X-A", "no CR, LF, NUL"),
    (CRED + '[credentials.headers]\nX-A = "café"', "credentials[0].headers.X-A", "visible ASCII"),
    (CRED + '[credentials.headers]\nX-A = "${UNSET_KEY}"', "credentials[0].headers.X-A", "UNSET_KEY is not set"),
    (CRED + '[credentials.headers]\nX-A = "a"\nx-a = "b"', "credentials[0].headers.x-a", "set twice"),
    # allowed_upstreams
    (CRED + 'allowed_upstreams = "https://x/"', "credentials[0].allowed_upstreams", "expected an array, got string"),
    (CRED + 'allowed_upstreams = ["api.openai.com/v1"]', "credentials[0].allowed_upstreams[0]", "absolute http"),
    (CRED + 'allowed_upstreams = ["ftp://x/"]', "credentials[0].allowed_upstreams[0]", "absolute http"),
    (CRED + 'allowed_upstreams = ["https:///v1"]', "credentials[0].allowed_upstreams[0]", "absolute http"),
    (CRED + 'allowed_upstreams = ["https://a/", 1]', "credentials[0].allowed_upstreams[1]", "expected a string"),
    (CRED + 'allowed_upstreams = ["https://x/#v1"]', "credentials[0].allowed_upstreams[0]", "fragment"),
    (CRED + 'allowed_upstreams = ["https://x:99999/"]', "credentials[0].allowed_upstreams[0]", "port"),
    (CRED + 'allowed_upstreams = [" https://x/"]', "credentials[0].allowed_upstreams[0]", "whitespace"),
    (CRED + 'allowed_upstreams = ["https://u:p@x/"]', "credentials[0].allowed_upstreams[0]", "user info"),
    # cors
    ("[cors]\nallow_origin = []", "cors.allow_origin", "unknown key 'allow_origin'"),
    ("[cors]\nmax_age = -1", "cors.max_age", "must be at least 0"),
    ("[cors]\nallow_credentials = true", "cors.allow_credentials", "browsers reject"),
    ('[cors]\nallow_origins = ["https://a.com", "*"]\nallow_credentials = true', "cors.allow_credentials", "'*'"),
    ('[cors]\nallow_credentials = "yes"', "cors.allow_credentials", "expected a boolean, got string"),
    ('[cors]\nallow_origins = ["https://a.com/"]', "cors.allow_origins[0]", "no path"),
    ('[cors]\nallow_origins = ["a.com"]', "cors.allow_origins[0]", "scheme://host[:port]"),
    ('[cors]\nallow_origins = ["https://a.com:x"]', "cors.allow_origins[0]", "scheme://host[:port]"),
    ('[cors]\nallow_methods = ["GET", "GET POST"]', "cors.allow_methods[1]", "not an HTTP token"),
    ('[cors]\nallow_headers = ["a:b"]', "cors.allow_headers[0]", "not an HTTP token"),
    ('[cors]\nexpose_headers = "x-id"', "cors.expose_headers", "expected an array, got string"),
    # log
    ('[log]\nlevel = "verbose"', "log.level", "must be one of debug, info, warning, error"),
    ('[log]\nformat = "text"', "log.format", "must be one of json, console"),
    ("[log]\nlevel = 10", "log.level", "expected a string, got integer"),
    ('[log]\ncolour = "auto"', "log.colour", "unknown key 'colour'; allowed keys: level, format"),
    # background jobs: the credential's callbacks and webhook secrets, the [jobs] table
    (CRED + 'allowed_callbacks = ["https://app/hooks/"]', "credentials[0].allowed_callbacks", "needs webhook_secret"),
    (CRED + 'allowed_callbacks = ["ftp://app/"]\n' + HOOK, "credentials[0].allowed_callbacks[0]", "absolute http"),
    (CRED + 'webhook_secret = "whsec_c2hvcnQ="', "credentials[0].webhook_secret", "decodes to 5 bytes"),
    (CRED + 'webhook_secret = "sk-not-base64!"', "credentials[0].webhook_secret", "not whsec_ followed by base64"),
    (CRED + 'webhook_secret_env = ["NOPE"]', "credentials[0].webhook_secret_env[0]", "variable NOPE is not set"),
    (CRED + 'webhook_secret_env = "APP_SECRET"', "credentials[0].webhook_secret_env", "not a Standard Webhooks"),
    (JOBS + 'store = "postgres"', "jobs.store", "must be one of sqlite, redis"),
    ('[jobs]\npath = "j.sqlite3"', "jobs.public_url", "is required when jobs are enabled"),
    ('[jobs]\npublic_url = "app.example.com/ai"', "jobs.public_url", "absolute http:// or https:// URL"),
    ('[jobs]\npublic_url = "ftp://app.example.com/"', "jobs.public_url", "absolute http:// or https:// URL"),
    ('[jobs]\npublic_url = "https://app.example.com/ai?x=1"', "jobs.public_url", "must not have a query"),
    ('[jobs]\npublic_url = "https://u:p@app.example.com/"', "jobs.public_url", "must not contain user info"),
    (JOBS + 'path = ""', "jobs.path", "must not be empty"),
    (JOBS + "retry_schedule = []", "jobs.retry_schedule", "must not be empty"),
    (JOBS + "retry_schedule = [5, -1]", "jobs.retry_schedule[1]", "must be at least 0"),
    (JOBS + "max_jobs_queued = 0", "jobs.max_jobs_queued", "must be at least 1"),
    (JOBS + "max_jobs_in_flight = 1.5", "jobs.max_jobs_in_flight", "expected an integer, got float"),
    (JOBS + "lease = 0", "jobs.lease", "must be greater than 0"),
    ('[jobs]\nenabled = "yes"', "jobs.enabled", "expected a boolean, got string"),
    (JOBS + "queue = 1", "jobs.queue", "unknown key 'queue'; allowed keys: enabled, public_url, store, path, "),
    # cache
    ('[cache]\nbackend = "disk"', "cache.backend", "must be one of memory, redis, not 'disk'"),
    ("[cache]\nmax_bytes = 0", "cache.max_bytes", "must be at least 1"),
    ("[cache]\nmax_followers = 1.5", "cache.max_followers", "expected an integer, got float"),
    ('[cache]\nurl = "http://cache"', "cache.url", "redis:// , rediss:// or unix:// URL".replace(" ,", ",")),
    ('[cache]\nparam = ""', "cache.param", "must not be empty"),
    ('[cache]\nparam = "pw_user"', "cache.param", "'pw_user' is already the server.user_param"),
    ('[cache]\nkey_headers = ["a b"]', "cache.key_headers[0]", "not an HTTP token"),
    (f"{CRED}cache = 5", "credentials[0].cache", "expected a table, got integer"),
    (f"{CRED}[credentials.cache]\nttl = -5", "credentials[0].cache.ttl", "must be at least 0"),
    (f'{CRED}[credentials.cache]\nreplay = "fast"', "credentials[0].cache.replay", "must be one of instant, paced"),
    (f"{CRED}[credentials.cache]\nttl_s = 5", "credentials[0].cache.ttl_s", "unknown key 'ttl_s'; did you mean 'ttl'?"),
    (f"{CRED}[credentials.cache]\nmax_entry_bytes = 0", "credentials[0].cache.max_entry_bytes", "at least 1"),
]


def test_jobs_are_off_without_the_table_and_on_with_it():
    assert parse_config("", {}).jobs == JobsConfig() and not JobsConfig().enabled
    config = parse_config(
        '[jobs]\npublic_url = "HTTPS://App.example.com/ai/"\npath = "/var/lib/parkway/jobs.sqlite3"\n'
        "retry_schedule = [1, 2.5]",
        {},
    )
    assert config.jobs == JobsConfig(
        enabled=True,
        public_url="https://app.example.com/ai",
        path="/var/lib/parkway/jobs.sqlite3",
        retry_schedule=(1.0, 2.5),
    )
    assert not parse_config("[jobs]\nenabled = false", {}).jobs.enabled


def test_credential_callbacks_and_rotated_webhook_secrets():
    env = {**ENV, "HOOK": WHSEC, "HOOK_NEXT": "whsec_" + "A" * 43 + "="}
    text = CRED + 'allowed_callbacks = ["HTTPS://App.example.com/hooks/"]\nwebhook_secret_env = ["HOOK", "HOOK_NEXT"]'
    (cred,) = parse_config(text, env).credentials
    assert cred.allowed_callbacks == ("https://app.example.com/hooks/",)
    assert cred.webhook_secrets == (WHSEC, env["HOOK_NEXT"])
    assert WHSEC not in repr(cred)
    # a bad secret is named by its key, never shown
    (problem,) = problems_of(CRED + 'webhook_secret = "whsec_c2VjcmV0LXNob3J0"')
    assert "c2VjcmV0" not in problem.message


def test_cache_sections() -> None:
    text = f"""{CRED}[credentials.cache]
ttl = 86400
namespace = "team"
per_user = true
replay = "PACED"
honour_upstream_no_store = false

[cache]
backend = "redis"
url = "redis://:${{API_KEY}}@cache:6379/1"
key_headers = ["Accept", "X-Model-Version"]
"""
    config = parse_config(text, ENV)
    assert config.credentials[0].cache == CacheRules(86400, "team", True, "paced", False, None)
    assert config.cache == CacheConfig(
        backend="redis", url=f"redis://:{API_KEY}@cache:6379/1", key_headers=("accept", "x-model-version")
    )
    assert parse_config(CRED, ENV).credentials[0].cache is None and parse_config(CRED, ENV).cache == CacheConfig()


@pytest.mark.parametrize(("text", "path", "message"), PROBLEMS, ids=[p for _, p, _ in PROBLEMS])
def test_problem_is_reported_at_its_path(text, path, message):
    found = problems_of(text)
    assert [p.path for p in found] == [path], found
    assert message in found[0].message


@pytest.mark.parametrize(
    "name", ["Connection", "keep-alive", "Proxy-Connection", "Transfer-Encoding", "TE", "Trailer", "Upgrade"]
)
def test_hop_by_hop_headers_cannot_be_injected(name):
    (problem,) = problems_of(f'{CRED}[credentials.headers]\n{name} = "x"')
    assert problem == ConfigProblem(
        f"credentials[0].headers.{name}",
        f"{name} cannot be injected: it is hop-by-hop (RFC 9110 §7.6.1): "
        "it describes one connection and Parkway manages it",
    )


@pytest.mark.parametrize(("name", "why"), [("Host", "upstream URL"), ("content-length", "body")])
def test_framing_headers_cannot_be_injected(name, why):
    (problem,) = problems_of(f'{CRED}[credentials.headers]\n{name} = "x"')
    assert problem.path == f"credentials[0].headers.{name}"
    assert "cannot be injected" in problem.message and why in problem.message


def test_zero_is_accepted_where_it_means_something():
    server = parse_config("[server]\nrequest_timeout = 0\ndrain_timeout = 0\nclock_skew = 0", {}).server
    assert (server.request_timeout, server.drain_timeout, server.clock_skew) == (0.0, 0.0, 0.0)


def test_every_problem_in_a_file_is_reported():
    text = """
        [server]
        listen = ["nope"]
        max_connections = 0
        [[credentials]]
        id = "a/b"
        secret_env = "NOPE"
        [credentials.headers]
        Connection = "close"
        [cors]
        max_age = -1
        [log]
        level = "loud"
        [metrics]
    """
    assert [p.path for p in problems_of(text)] == [
        "server.listen[0]",
        "server.max_connections",
        "credentials[0].id",
        "credentials[0].secret_env",
        "credentials[0].headers.Connection",
        "cors.max_age",
        "log.level",
        "metrics",
    ]


@pytest.mark.parametrize(
    "text, path, meant",
    [
        ("[server]\nmax_inflight = 1", "server.max_inflight", "max_in_flight"),
        ("[server]\nupstream_idle_timout = 1", "server.upstream_idle_timout", "upstream_idle_timeout"),
        (CRED + "allowed_upstream = []", "credentials[0].allowed_upstream", "allowed_upstreams"),
        (CRED + "limits = { rat = 5 }", "credentials[0].limits.rat", "rate"),
    ],
)
def test_a_misspelt_key_gets_a_did_you_mean_not_every_key(text, path, meant):
    """[server] has more than 25 keys: a typo there is answered with the one it misspells."""
    (problem,) = problems_of(text)
    key = path.rpartition(".")[2]
    assert problem == ConfigProblem(path, f"unknown key {key!r}; did you mean {meant!r}?")


def test_problems_in_one_list_are_all_reported():
    found = problems_of('[server]\nlisten = ["a", "b:1", "c"]')
    assert [p.path for p in found] == ["server.listen[0]", "server.listen[2]"]


def test_config_from_dict_refuses_a_non_table():
    with pytest.raises(ConfigError) as info:
        config_from_dict([], {})  # type: ignore[arg-type]
    assert info.value.problems == (ConfigProblem("", "expected a table, got array"),)


def test_toml_syntax_error_is_one_problem_with_its_position():
    (problem,) = problems_of('[server]\nlisten = = ["a"]\n')
    assert problem.path == ""
    assert problem.message.startswith("invalid TOML: ")
    assert "(at line 2, column 10)" in problem.message


# --- secrets stay secret ----------------------------------------------------------------------


def test_secrets_and_header_values_are_absent_from_repr():
    env = {**ENV, "OTHER": "env-secret-zzz"}
    text = CRED + 'secret = "inline-secret-yyy"\nsecret_env = ["APP_SECRET", "OTHER"]\n'
    text = text.replace('secret_env = "APP_SECRET"\n', "")
    config = parse_config(text + '[credentials.headers]\nAuthorization = "Bearer ${API_KEY}"', env)
    assert config.credentials[0].secrets == ("inline-secret-yyy", SECRET, "env-secret-zzz")
    for shown in (repr(config), str(config), repr(config.credentials[0])):
        assert "app" in shown
        for value in ("inline-secret-yyy", SECRET, "env-secret-zzz", API_KEY):
            assert value not in shown


@pytest.mark.parametrize(
    "text",
    [
        # A secret pasted where an environment variable name belongs.
        '[[credentials]]\nid = "a"\nsecret_env = "sk-live-abcdef123456"',
        f'{CRED}[credentials.headers]\nAuthorization = "Bearer ${{sk-live-abcdef123456}}"',
        # Values that are refused must not be quoted back.
        f'{CRED}[credentials.headers]\nX-A = "sk-live-abcdef123456\\n"',
        f'{CRED}[credentials.headers]\nX-A = "${{API_KEY_NL}}"',
        f'{CRED}allowed_upstreams = ["https://u:sk-live-abcdef123456@x/"]',
        '[[credentials]]\nid = "a"\nsecret = ["sk-live-abcdef123456", 1]',
    ],
)
def test_secrets_are_absent_from_problem_messages(text):
    env = {**ENV, "API_KEY_NL": API_KEY + "\r\nX-Evil: 1"}
    with pytest.raises(ConfigError) as info:
        parse_config(text, env)
    assert info.value.problems  # refused, and ...
    assert API_KEY not in str(info.value)


def test_secret_values_from_the_environment_are_absent_from_problems():
    text = CRED + '[credentials.headers]\nX-A = "${API_KEY}"\nConnection = "${API_KEY}"\n[log]\nlevel = 0'
    with pytest.raises(ConfigError) as info:
        parse_config(text, ENV)
    assert len(info.value.problems) == 2
    assert SECRET not in str(info.value) and API_KEY not in str(info.value)


# --- ${VAR} expansion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expanded"),
    [
        ("Bearer ${API_KEY}", f"Bearer {API_KEY}"),
        ("${APP_SECRET}:${API_KEY}", f"{SECRET}:{API_KEY}"),
        ("$${API_KEY}", "${API_KEY}"),
        ("${API_KEY} and $${literal}", f"{API_KEY} and ${{literal}}"),
        ("plain", "plain"),
        ("costs $5, $API_KEY, {API_KEY}", "costs $5, $API_KEY, {API_KEY}"),
        ("${NESTED}", "${API_KEY}"),  # substituted text is not expanded again
    ],
)
def test_expand_env(value, expanded):
    assert expand_env(value, {**ENV, "NESTED": "${API_KEY}"}, "p") == expanded


@pytest.mark.parametrize(
    ("value", "messages"),
    [
        ("${MISSING}", ["environment variable MISSING is not set or is empty"]),
        ("${EMPTY}", ["environment variable EMPTY is not set or is empty"]),
        ("${A} ${API_KEY} ${B}", ["variable A is not set", "variable B is not set"]),
        ("x ${API_KEY", ["unterminated '${'"]),
        ("${}", ["must hold a variable name"]),
        ("${not-a-name}", ["must hold a variable name"]),
    ],
)
def test_expand_env_problems(value, messages):
    with pytest.raises(ConfigError) as info:
        expand_env(value, ENV, "credentials[3].headers.X")
    assert [p.path for p in info.value.problems] == ["credentials[3].headers.X"] * len(messages)
    for problem, message in zip(info.value.problems, messages):
        assert message in problem.message
    assert "not-a-name" not in str(info.value)


# --- Config objects ---------------------------------------------------------------------------


def test_websocket_table():
    config = parse_config("[websocket]\nmax_message_size = 33554432\nidle_timeout = 0\nclose_timeout = 1.5", ENV)
    assert config.websocket == WebSocketConfig(max_message_size=33554432, idle_timeout=0.0, close_timeout=1.5)
    assert parse_config("", ENV).websocket == WebSocketConfig()


def test_credential_lookup():
    config = parse_config(CRED + '[[credentials]]\nid = "b"\nsecret = "x"', ENV)
    assert config.credential("app") is config.credentials[0]
    assert config.credential("b") is config.credentials[1]
    assert config.credential("missing") is None
    assert config.credential("APP") is None  # ids are exact


def test_config_stays_frozen_comparable_and_hashable():
    one, two = parse_config(CRED, ENV), parse_config(CRED, ENV)
    assert one == two and hash(one) == hash(two)
    assert one != parse_config(CRED.replace('"app"', '"b"'), ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.credentials = ()  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(Config)] == [
        "server",
        "credentials",
        "cors",
        "log",
        "admin",
        "state",
        "websocket",
        "jobs",
        "cache",
        "budgets",
        "telemetry",
    ]
    replaced = dataclasses.replace(one, credentials=(Credential("new", ("s",)),))
    assert replaced.credential("new") is not None and replaced.credential("app") is None


def test_config_refuses_duplicate_ids_when_built_directly():
    with pytest.raises(ValueError):
        Config(credentials=(Credential("a", ("s",)), Credential("a", ("t",))))


# --- load_config ------------------------------------------------------------------------------


def test_load_config_reads_the_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PARKWAY_TEST_SECRET", "from-os-environ")
    path = tmp_path / "parkway.toml"
    path.write_text('[[credentials]]\nid = "a"\nsecret_env = "PARKWAY_TEST_SECRET"\n')
    assert load_config(str(path)).credentials[0].secrets == ("from-os-environ",)


def test_load_config_unreadable_file(tmp_path):
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    (problem,) = info.value.problems
    assert problem.path == ""
    assert str(missing) in problem.message and "No such file" in problem.message


def test_load_config_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[log]\nlevel = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    (problem,) = info.value.problems
    assert problem.path == "" and "not UTF-8" in problem.message


def test_an_unknown_budgets_key_lists_only_keys_that_may_be_set():
    [problem] = problems_of("[budgets]\nzebra = 1")
    assert problem.path == "budgets.zebra"
    assert problem.message == (
        "unknown key 'zebra'; allowed keys: prices, input_bytes_per_token, unbounded_hold, default_max_tokens, "
        "session_hold"
    )  # price_table is filled from the file named by prices: never offered as a key
    [refused] = problems_of("[budgets]\nprice_table = 1")
    assert (refused.path, refused.message) == ("budgets.price_table", "is read from the file named by prices")


# --- what the docs say a rate means ------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_rate_table_in_the_limits_doc_is_what_the_parser_does():
    """`rate = 5` is per second: the docs say so in a table, and each row is checked here."""
    text = (DOCS / "limits.md").read_text()
    table = text[text.index("| `rate =` | requests per second |") :].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([\d.]+)\b", table, re.M)
    assert {value for value, _ in rows} >= {"5", "0.5", '"600/min"'}, rows
    for value, per_second in rows:
        credential = parse_config(f"{CRED}limits = {{ rate = {value} }}", ENV).credentials[0]
        assert credential.limits is not None and credential.limits.rate == pytest.approx(float(per_second)), value


def test_the_configuration_doc_says_a_bare_rate_is_per_second():
    row = next(line for line in (DOCS / "configuration.md").read_text().splitlines() if line.startswith("| `limits` |"))
    assert "per second" in row and "`rate = 5`" in row


# --- [telemetry] --------------------------------------------------------------------------------


def test_telemetry_is_off_by_default_and_read_from_its_table():
    assert parse_config("", {}).telemetry == TelemetryConfig()
    assert not TelemetryConfig().enabled
    text = '[telemetry]\notlp_endpoint = "http://collector:4318/"\nservice_name = "edge"\nsample_ratio = 0.25\n'
    config = parse_config(text + "record_user = true\n", {})
    assert config.telemetry == TelemetryConfig("http://collector:4318/", "edge", 0.25, True)
    assert config.telemetry.traces_url == "http://collector:4318/v1/traces"


def test_telemetry_without_its_table_reads_the_standard_variables():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SERVICE_NAME": "parkway-eu"}
    assert parse_config("", env).telemetry == TelemetryConfig("http://127.0.0.1:4318", "parkway-eu")
    # The table wins over the variables, even to turn tracing off.
    assert parse_config('[telemetry]\notlp_endpoint = ""\n', env).telemetry == TelemetryConfig()
    (problem,) = problems_of("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"})
    assert problem.path == "OTEL_EXPORTER_OTLP_ENDPOINT" and "http://" in problem.message


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ('otlp_endpoint = "grpc://x:4317"', "telemetry.otlp_endpoint", "must be an http:// or https:// URL"),
        ("sample_ratio = 1.5", "telemetry.sample_ratio", "must be between 0 and 1"),
        ("sample_ratio = -0.1", "telemetry.sample_ratio", "must be at least 0"),
        ('service_name = ""', "telemetry.service_name", "must not be empty"),
        ('record_user = "yes"', "telemetry.record_user", "expected a boolean"),
        ("exporter = 1", "telemetry.exporter", "unknown key 'exporter'"),
    ],
)
def test_telemetry_problems(text, path, message):
    (problem,) = problems_of(f"[telemetry]\n{text}\n")
    assert problem.path == path and message in problem.message


def test_propagate_trace_is_a_credential_setting():
    config = parse_config(CRED + "propagate_trace = true\n", ENV)
    assert config.credentials[0].propagate_trace is True
    assert parse_config(CRED, ENV).credentials[0].propagate_trace is False


def test_what_the_memory_state_keeps_in_each_process_is_named_for_the_workers_warning():
    from proxy.config import kept_per_process

    assert kept_per_process(parse_config(CRED, ENV)) == ["single-use URLs"]
    limited = parse_config(CRED + 'limits = { rate = "5/s" }\n', ENV)
    assert kept_per_process(limited) == ["limits", "single-use URLs"]
    budgeted = parse_config(CRED + 'user_budget = { tokens = 50_000, per = "day" }\n', ENV)
    assert kept_per_process(budgeted) == ["budgets", "single-use URLs"]
    both = parse_config(CRED + 'user_limits = { rate = "1/s" }\nbudget = { tokens = 1_000, per = "day" }\n', ENV)
    assert kept_per_process(both) == ["limits", "budgets", "single-use URLs"]
    shared = parse_config('[state]\nbackend = "redis"\n' + CRED + 'limits = { rate = "5/s" }\n', ENV)
    assert kept_per_process(shared) == []
