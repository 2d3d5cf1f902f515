"""proxy.cli, in process: ``main([...])`` with captured output; nothing here starts a server."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import signway_sdk

from proxy.cli import build_parser, main, serve_config, signway_compat_config
from proxy.config import CorsConfig, LogConfig
from proxy.errors import Forbidden
from proxy.verify import parse_signed_request, verify_signature

SECRET = "super-secure-string"
PROXY = "https://api.openai.com/v1/chat/completions"
HOST = "http://127.0.0.1:8080"
BODY = '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say this is a test"}]}'


# --- sign --------------------------------------------------------------------------------


def sign(capsys, *argv: str) -> str:
    assert main(["sign", "--id", "app-id", "--proxy", PROXY, "--host", HOST, *argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    return out.strip()


def test_sign_prints_a_url_that_verifies(capsys):
    url = sign(capsys, "--secret", SECRET, "--expiry", "120")
    parts = urlsplit(url)
    req = parse_signed_request(parts.query)

    assert f"{parts.scheme}://{parts.netloc}" == HOST and parts.path == "/"
    assert (req.credential_id, req.expires, req.proxy_url) == ("app-id", 120, PROXY)
    assert (req.signed_headers, req.body_signed) == ((), False)
    assert abs(datetime.now(UTC) - req.date) < timedelta(minutes=5)
    verify = dict(method="POST", paths=[parts.path], headers={}, body=None)
    verify_signature(req, secrets=[SECRET], **verify)
    with pytest.raises(Forbidden):
        verify_signature(req, secrets=["another-secret"], **verify)
    with pytest.raises(Forbidden):
        verify_signature(req, secrets=[SECRET], **{**verify, "method": "GET"})
    # Byte for byte what the Python SDK makes for the same instant.
    assert url == signway_sdk.sign_url(
        id="app-id",
        secret=SECRET,
        host=HOST,
        proxy_url=PROXY,
        expiry=120,
        method="POST",
        datetime_override=req.date.replace(tzinfo=None),
    )


def test_sign_with_headers_body_and_secret_from_env(capsys, monkeypatch):
    monkeypatch.setenv("PARKWAY_TEST_SIGNING_SECRET", SECRET)
    url = sign(
        capsys,
        "--secret-env",
        "PARKWAY_TEST_SIGNING_SECRET",
        "--header",
        "Content-Type: application/json",
        "--body",
        BODY,
    )
    assert SECRET not in url
    req = parse_signed_request(urlsplit(url).query)

    assert req.signed_headers == ("content-type", "content-length") and req.body_signed
    verify = dict(method="POST", paths=["/"], headers={"content-type": "application/json"})
    verify_signature(req, secrets=[SECRET], body=BODY.encode(), **verify)
    with pytest.raises(Forbidden):
        verify_signature(req, secrets=[SECRET], body=BODY.encode().replace(b"test", b"TEST"), **verify)
    assert url == signway_sdk.sign_url(
        id="app-id",
        secret=SECRET,
        host=HOST,
        proxy_url=PROXY,
        expiry=300,
        method="POST",
        headers={"Content-Type": "application/json"},
        body=BODY,
        datetime_override=req.date.replace(tzinfo=None),
    )


def test_sign_with_extra_params_and_get(capsys):
    url = sign(capsys, "--secret", SECRET, "--method", "GET", "--param", "user=u 42")
    req = parse_signed_request(urlsplit(url).query)
    assert req.extra_params() == {"user": "u 42"}
    verify_signature(req, method="GET", secrets=[SECRET], paths=["/"], headers={}, body=None)


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_sign_with_a_traceparent_signs_it_as_pw_traceparent(capsys, monkeypatch):
    monkeypatch.delenv("TRACEPARENT", raising=False)
    url = sign(capsys, "--secret", SECRET, "--method", "GET", "--traceparent", TRACEPARENT)
    req = parse_signed_request(urlsplit(url).query)
    assert req.extra_params() == {"pw_traceparent": TRACEPARENT}
    verify_signature(req, method="GET", secrets=[SECRET], paths=["/"], headers={}, body=None)
    # The OpenTelemetry convention for a process started inside a trace: $TRACEPARENT.
    monkeypatch.setenv("TRACEPARENT", TRACEPARENT)
    url = sign(capsys, "--secret", SECRET, "--method", "GET")
    assert parse_signed_request(urlsplit(url).query).extra_params() == {"pw_traceparent": TRACEPARENT}


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no secret at all
        ["--secret-env", "PARKWAY_TEST_UNSET_VARIABLE"],
        ["--secret", SECRET, "--param", "no-equals-sign"],
        ["--secret", SECRET, "--header", "Content-Type application/json"],
        ["--secret", SECRET, "--traceparent", "00-abc-def-01"],
    ],
    ids=["no-secret", "unset-secret-env", "bad-param", "bad-header", "bad-traceparent"],
)
def test_sign_usage_errors(capsys, monkeypatch, argv):
    monkeypatch.delenv("PARKWAY_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["sign", "--id", "app-id", "--proxy", PROXY, *argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "error:" in err


@pytest.mark.parametrize(
    "value, said",
    [(None, "PARKWAY_TEST_SECRET is not set"), ("", "PARKWAY_TEST_SECRET is empty")],
    ids=["unset", "empty"],
)
def test_sign_names_the_secret_variable_that_is_missing(capsys, monkeypatch, value, said):
    if value is None:
        monkeypatch.delenv("PARKWAY_TEST_SECRET", raising=False)
    else:
        monkeypatch.setenv("PARKWAY_TEST_SECRET", value)
    with pytest.raises(SystemExit) as info:
        main(["sign", "--id", "app-id", "--proxy", PROXY, "--secret-env", "PARKWAY_TEST_SECRET"])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.rstrip().endswith(f"error: --secret-env: {said}")


# --- check-config --------------------------------------------------------------------------

VALID = """
[server]
listen = ["127.0.0.1:0", "[::1]:0"]

[[credentials]]
id = "app"
secret = "TOPSECRET-inline-1234"
allowed_upstreams = ["https://api.openai.com/v1/"]
[credentials.headers]
Authorization = "Bearer ${PARKWAY_TEST_API_KEY}"
"""

INVALID = """
[server]
listen = "nowhere"
header_read_timeout = -1

[cors]
allow_origins = ["https://ok.example", "https://bad.example/path"]
allow_credentials = "yes"

[log]
colour = "always"

[[credentials]]
id = "a/b"
secret = "TOPSECRET-inline-1234"
[credentials.headers]
Authorization = "Bearer ${PARKWAY_TEST_UNSET_KEY}"
X-Api-Key = "${PARKWAY_TEST_BAD_KEY}"
Host = "evil.example"

[[credentials]]
id = "second"
"""

INVALID_PATHS = {
    "server.listen",
    "server.header_read_timeout",
    "cors.allow_origins[1]",
    "cors.allow_credentials",
    "log.colour",
    "credentials[0].id",
    "credentials[0].headers.Authorization",
    "credentials[0].headers.X-Api-Key",
    "credentials[0].headers.Host",
    "credentials[1]",
}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("PARKWAY_TEST_API_KEY", "sk-live-from-env-5678")
    # A value that is set but refused (it would smuggle a header): it must not be echoed either.
    monkeypatch.setenv("PARKWAY_TEST_BAD_KEY", "sk-leaky-9999\r\nX-Injected: 1")
    monkeypatch.delenv("PARKWAY_TEST_UNSET_KEY", raising=False)


def test_check_config_valid_file(tmp_path, capsys, env):
    path = tmp_path / "parkway.toml"
    path.write_text(VALID)

    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == f"{path}: OK (listen 127.0.0.1:0, [::1]:0; credentials: app)\n"
    assert "TOPSECRET" not in out and "sk-live" not in out


@pytest.mark.parametrize("private", ["", "allow_private_upstreams = true\n"], ids=["public", "private"])
def test_check_config_warns_of_a_credential_that_may_reach_any_upstream(tmp_path, capsys, env, private):
    path = tmp_path / "parkway.toml"
    path.write_text(VALID + f'[[credentials]]\nid = "open"\nsecret = "TOPSECRET-inline-5678"\n{private}')

    assert main(["check-config", str(path)]) == 0  # allowed, but said
    out, err = capsys.readouterr()
    assert out == f"{path}: OK (listen 127.0.0.1:0, [::1]:0; credentials: app, open)\n"
    reach = "any upstream, private addresses included" if private else "any public upstream"
    assert err == (
        f"{path}: credentials[1].allowed_upstreams: warning: not set, so URLs signed for 'open' may reach {reach}; "
        "list the URL prefixes it is for\n"
    )
    assert "TOPSECRET" not in err


def test_check_config_lists_every_problem_with_its_key_path(tmp_path, capsys, env):
    path = tmp_path / "parkway.toml"
    path.write_text(INVALID)

    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    *problems, summary = err.splitlines()
    assert summary == f"{path}: {len(INVALID_PATHS)} problem(s); Parkway would refuse to start"
    paths = []
    for line in problems:
        assert line.startswith(f"{path}: "), line
        paths.append(line.removeprefix(f"{path}: ").split(": ", 1)[0])
    assert sorted(paths) == sorted(INVALID_PATHS)
    for secret in ("TOPSECRET", "sk-leaky", "X-Injected"):
        assert secret not in err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        (b"[server\nlisten = 1", "invalid TOML"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
    ids=["missing", "not-toml", "not-utf8"],
)
def test_check_config_unreadable_file(tmp_path, capsys, content, message):
    path = tmp_path / "parkway.toml"
    if content is not None:
        path.write_bytes(content)

    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    problem, summary = err.splitlines()
    assert out == ""
    assert problem.startswith(f"{path}: ") and message in problem
    assert summary == f"{path}: 1 problem(s); Parkway would refuse to start"


# --- serve, Signway-style -----------------------------------------------------------------


def compat_config(*argv: str):
    parser = build_parser()
    return signway_compat_config(parser.parse_args(["serve", *argv]), parser)


def test_signway_arguments_make_one_credential_on_port_from_env(monkeypatch):
    monkeypatch.setenv("PORT", "8123")
    config = compat_config(
        "app-id", "s3cret", "--header", "Authorization: Bearer X", "--header", "X-Url: https://a.example:8443/x"
    )

    assert config.server.listen == ("0.0.0.0:8123",)
    [credential] = config.credentials
    assert credential.id == "app-id"
    assert credential.secrets == ("s3cret",)
    assert credential.headers == (("Authorization", "Bearer X"), ("X-Url", "https://a.example:8443/x"))
    assert credential.allowed_upstreams == ()
    assert config.cors == CorsConfig() and config.log == LogConfig()
    assert "s3cret" not in repr(config) and "Bearer X" not in repr(config)


def test_signway_arguments_default_port_and_listen_override(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    assert compat_config("app-id", "s3cret").server.listen == ("0.0.0.0:3000",)
    assert compat_config("app-id", "s3cret", "--listen", "127.0.0.1:9000").server.listen == ("127.0.0.1:9000",)


def test_signway_cors_flags_are_mapped(monkeypatch):
    config = compat_config(
        "app-id",
        "s3cret",
        "--access-control-allow-origin",
        "https://App.example, http://localhost:5173",
        "--access-control-allow-methods",
        "get,post",
        "--access-control-allow-headers",
        "content-type, authorization",
        "--log-format",
        "console",
    )
    assert config.cors == CorsConfig(
        allow_origins=("https://app.example", "http://localhost:5173"),
        allow_methods=("GET", "POST"),
        allow_headers=("content-type", "authorization"),
    )
    assert config.log.format == "console"


@pytest.mark.parametrize("bad", ["Authorization Bearer X", ": no-name", "   : blank-name"])
def test_malformed_header_is_a_usage_error(capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["serve", "app-id", "s3cret", "--header", bad])
    assert info.value.code == 2
    assert re.search(r"error: invalid --header", capsys.readouterr().err)


def test_malformed_header_error_does_not_echo_the_value(capsys):
    # A forgotten colon is the likely typo; the usage error must not print the API key.
    with pytest.raises(SystemExit):
        main(["serve", "app-id", "s3cret", "--header", "Authorization Bearer sk-live-abcdef123456"])
    assert "sk-live-abcdef123456" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["serve", "app-id"], ["serve", "--config", "parkway.toml", "app-id", "s3cret"]],
    ids=["nothing", "id-without-secret", "config-and-id"],
)
def test_serve_argument_mistakes_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# --- version -----------------------------------------------------------------------------


def test_version_is_the_package_version(capsys):
    import proxy

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"parkway {proxy.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", proxy.__version__)


@pytest.mark.parametrize("flag", ["h11", "httptools", "auto"])
def test_the_http_flag_overrides_the_file(tmp_path, flag):
    from proxy.cli import serve_config

    path = tmp_path / "parkway.toml"
    path.write_text('[server]\nhttp = "h11"\n[[credentials]]\nid = "a"\nsecret = "s"\n')
    parser = build_parser()
    config, overrides = serve_config(parser.parse_args(["serve", "--config", str(path), "--http", flag]), parser)
    assert config.server.http == flag and overrides.apply(config).server.http == flag
    config, _ = serve_config(parser.parse_args(["serve", "--config", str(path)]), parser)
    assert config.server.http == "h11"


def test_http_httptools_is_refused_when_it_is_not_installed(monkeypatch, capsys):
    import importlib.util

    from proxy.config import parse_config
    from proxy.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "httptools" else real(name, *a))
    with pytest.raises(ConfigError, match="parkway\\[fast\\]"):
        parse_config('[server]\nhttp = "httptools"\n', {})
    assert parse_config('[server]\nhttp = "auto"\n', {}).server.http == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--http", "bogus"])


# --- the shipped deployment ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_systemd_instances_bind_distinct_addresses(monkeypatch):
    """docs/deployment.md enables several instances of config/parkway.service, all reading
    config/parkway.toml: each must get its own public and admin address, or the second one
    fails to start (EADDRINUSE on the example's admin port)."""
    monkeypatch.setenv("PARKWAY_MY_APP_SECRET", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    unit = (ROOT / "config" / "parkway.service").read_text()
    exec_start = next(line.partition("=")[2] for line in unit.splitlines() if line.startswith("ExecStart="))
    enable = re.search(r"systemctl enable --now ((?:parkway@\d+ ?)+)", (ROOT / "docs" / "deployment.md").read_text())
    assert enable is not None
    instances = [name.partition("@")[2] for name in enable[1].split()]
    assert len(instances) >= 2

    bound: list[str] = []
    for instance in instances:
        command = exec_start.replace("%i", instance).replace(
            "/etc/parkway/parkway.toml", str(ROOT / "config" / "parkway.toml")
        )
        parser = build_parser()
        args = parser.parse_args(shlex.split(command)[1:])
        config, _ = serve_config(args, parser)
        bound += [*config.server.listen, *config.admin.listen]
    assert len(bound) == len(set(bound)), bound
