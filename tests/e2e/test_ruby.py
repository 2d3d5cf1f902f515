"""Ruby signers, run with Debian's ``ruby``: clients/ruby/parkway_signer.rb and the gem's algorithm.

1. ``ParkwaySigner.sign_url`` gives byte for byte the URL of ``proxy.signing.sign_url`` for a
   table of inputs (and Signway's published vectors), and Parkway accepts what it signs.
2. The ``signway_sdk`` gem cannot be installed here (rubygems is unreachable), so its
   published algorithm is restated in a small Ruby script, anchored against the Python
   ``signway_sdk`` where the two SDKs agree, and Parkway must accept its URLs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import signway_sdk
import trio

from proxy.signing import sign_url
from support.parkway import RunningParkway
from support.processes import ROOT, require_binary
from support.signing import SECRET, UPSTREAM_KEY
from support.upstream import Upstream

SIGNER_RB = ROOT / "clients" / "ruby" / "parkway_signer.rb"
RUBY_TIMEOUT = 20.0

# Reads a JSON array of keyword-argument tables on stdin, prints a JSON array of signed URLs.
# "now" is [epoch seconds, UTC offset in seconds]; "signer" picks the implementation.
TABLE_RB = r"""
require "json"
require ARGV.fetch(0)
require ARGV.fetch(1)

urls = JSON.parse($stdin.read).map do |args|
  epoch, offset = args.delete("now")
  now = Time.at(epoch).getlocal(offset)
  signer = args.delete("signer")
  kwargs = args.transform_keys(&:to_sym).merge(now: now)
  signer == "gem" ? SignwayGem.sign_url(**kwargs) : ParkwaySigner.sign_url(**kwargs)
end
puts JSON.generate(urls)
"""

# The signway_sdk gem's algorithm as published (gabotechs/signway-ruby-sdk,
# lib/signway_sdk.rb and signing_functions.rb), restated: CGI.escape for every query part,
# header names sorted, the proxy URL as URI(proxy_url).to_s, Content-Length = bytesize
# (an empty body means "no body"), the canonical path URI(url).path, the canonical query
# re-parsed with CGI.parse and sorted, header lines sorted as "name:value" strings.
GEM_RB = r"""
require "cgi"
require "uri"
require "openssl"

module SignwayGem
  module_function

  def sign_url(id:, secret:, host:, proxy_url:, expiry:, method:, headers: {}, body: "", now:)
    host = host.end_with?("/") ? host : "#{host}/"
    headers = headers.dup
    headers["Content-Length"] = body.bytesize.to_s unless body.empty?
    long_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    names = headers.keys.map { |name| name.to_s.downcase }.sort.join(";")
    unsigned = host +
      "?X-Sw-Algorithm=SW1-HMAC-SHA256" \
      "&X-Sw-Credential=#{CGI.escape("#{id}/#{day}")}" \
      "&X-Sw-Date=#{long_date}" \
      "&X-Sw-Expires=#{expiry}" \
      "&X-Sw-Proxy=#{CGI.escape(URI(proxy_url).to_s)}" \
      "&X-Sw-SignedHeaders=#{CGI.escape(names)}" \
      "&X-Sw-Body=#{body.empty? ? 'false' : 'true'}"
    uri = URI(unsigned)
    query = CGI.parse(uri.query.to_s)
               .flat_map { |key, values| values.map { |value| "#{CGI.escape(key)}=#{CGI.escape(value)}" } }
               .sort.join("&")
    lines = headers.map { |name, value| "#{name.to_s.downcase}:#{value.strip}" }.sort.join("\n")
    canonical = "#{method}\n#{uri.path}\n#{query}\n#{lines}\n\n#{names}\n#{body}"
    key = OpenSSL::HMAC.digest("sha256", "SW1-HMAC-SHA256#{secret}", day)
    to_sign = "SW1-HMAC-SHA256\n#{long_date}\n#{day}\n#{OpenSSL::Digest.new('sha256').hexdigest(canonical)}"
    "#{unsigned}&X-Sw-Signature=#{OpenSSL::HMAC.hexdigest('sha256', key, to_sign)}"
  end
end
"""


async def ruby_sign(tmp_path: Path, cases: list[dict[str, Any]]) -> list[str]:
    """Sign ``cases`` in one ``ruby`` process; its stderr is the failure message."""
    ruby = require_binary("ruby")
    (tmp_path / "table.rb").write_text(TABLE_RB)
    (tmp_path / "signway_gem.rb").write_text(GEM_RB)
    with trio.fail_after(RUBY_TIMEOUT):
        result = await trio.run_process(
            [ruby, "-W0", str(tmp_path / "table.rb"), str(SIGNER_RB), str(tmp_path / "signway_gem.rb")],
            stdin=json.dumps(cases).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, f"ruby failed:\n{result.stderr.decode()}"
    urls = json.loads(result.stdout)
    assert len(urls) == len(cases)
    return urls


# --- 1. byte-for-byte parity with proxy.signing.sign_url -------------------------------------

NOV_20 = int(datetime(2026, 11, 20, 12, 0, tzinfo=UTC).timestamp())
VECTOR = dict(id="app-id", secret="super-secure-string", host="http://127.0.0.1:8080", now=[NOV_20, 0])
OPENAI = "https://api.openai.com/v1/chat/completions"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CHAT = '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say this is a test"}]}'

# SIGNING.md's vectors, made by the Python signway-sdk: both signers must reproduce them.
GOLDEN = {
    "post": (
        dict(VECTOR, method="POST", expiry=300, proxy_url=OPENAI),
        "http://127.0.0.1:8080/?X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Credential=app-id%2F20261120&X-Sw-Date=20261120T120000Z&X-Sw-Expires=300&X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions&X-Sw-SignedHeaders=&X-Sw-Body=false&X-Sw-Signature=fa823ddfab21ccc049097df8543ec5e9f199b979caeb15700af67d416d9bc4fc",
    ),
    "get-proxy-query": (
        dict(VECTOR, method="GET", expiry=60, proxy_url="https://api.openai.com/v1/models?limit=2&order=desc"),
        "http://127.0.0.1:8080/?X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Credential=app-id%2F20261120&X-Sw-Date=20261120T120000Z&X-Sw-Expires=60&X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fmodels%3Flimit%3D2%26order%3Ddesc&X-Sw-SignedHeaders=&X-Sw-Body=false&X-Sw-Signature=69fe4cddb3010db59f29ea85e17a66661fe13ba2a2810b5304be918a31e39540",
    ),
    "signed-body": (
        dict(
            VECTOR, method="POST", expiry=300, proxy_url=OPENAI, headers={"Content-Type": "application/json"}, body=CHAT
        ),
        "http://127.0.0.1:8080/?X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Credential=app-id%2F20261120&X-Sw-Date=20261120T120000Z&X-Sw-Expires=300&X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions&X-Sw-SignedHeaders=content-type%3Bcontent-length&X-Sw-Body=true&X-Sw-Signature=074a09a715d734c60444a1dc962016001b69e8695a491b19657bdb4ce0621a70",
    ),
    "host-with-path": (
        dict(VECTOR, host="https://example.com/ai", method="POST", expiry=300, proxy_url=OPENAI),
        "https://example.com/ai/?X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Credential=app-id%2F20261120&X-Sw-Date=20261120T120000Z&X-Sw-Expires=300&X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions&X-Sw-SignedHeaders=&X-Sw-Body=false&X-Sw-Signature=c587e7327b50ba598ab0a436e0bceb8033a001cd2dddc6bc62f2f5552554a36b",
    ),
}

TABLE: dict[str, dict[str, Any]] = {
    **{name: args for name, (args, _) in GOLDEN.items()},
    "non-ascii-body-and-header": dict(
        VECTOR,
        method="POST",
        expiry=120,
        proxy_url=OPENAI,
        headers={"Content-Type": "text/plain; charset=utf-8", "X-User": "  Zoë  "},
        body="héllo — 你好 🙂",
    ),
    "empty-body-is-signed": dict(VECTOR, method="POST", expiry=30, proxy_url=OPENAI, body=""),
    "content-length-replaced": dict(
        VECTOR,
        method="PUT",
        expiry=30,
        proxy_url=OPENAI,
        headers={"content-length": "999", "Accept": "*/*"},
        body="abc",
    ),
    "content-length-kept-without-body": dict(
        VECTOR, method="GET", expiry=30, proxy_url=OPENAI, headers={"Content-Length": "0"}
    ),
    "headers-sharing-a-prefix": dict(
        VECTOR,
        method="GET",
        expiry=30,
        proxy_url=OPENAI,
        headers={"Accept-Language": "fr", "Accept": "text/event-stream", "X-A-B": "1", "X-A": "2"},
    ),
    "extra-params": dict(
        VECTOR,
        method="POST",
        expiry=300,
        proxy_url=OPENAI,
        params={"user": "alice smith", "tier": "gold/ü+~*", "empty": ""},
    ),
    "traceparent-after-params": dict(
        VECTOR, method="POST", expiry=300, proxy_url=OPENAI, params={"pw_user": "42"}, traceparent=TRACEPARENT
    ),
    "lower-case-method": dict(VECTOR, method="post", expiry=300, proxy_url=OPENAI),
    "host-trailing-slash-and-space": dict(
        VECTOR, host="https://Example.com/my ai/", method="GET", expiry=9, proxy_url=OPENAI
    ),
    "proxy-upper-case-default-port": dict(
        VECTOR, method="GET", expiry=60, proxy_url="HTTPS://API.OpenAI.com:443/v1/models"
    ),
    "proxy-no-path": dict(VECTOR, method="GET", expiry=60, proxy_url="https://api.example.com"),
    "proxy-other-port": dict(VECTOR, method="GET", expiry=60, proxy_url="http://api.example.com:8080?x=1"),
    "proxy-dot-segments-and-specials": dict(
        VECTOR,
        method="GET",
        expiry=60,
        proxy_url="http://127.0.0.1:80/a/./b/../c d/%2e%2E/e?q=\"x y\"&r=<'z'>#frag ment",
    ),
    "proxy-non-ascii-path": dict(VECTOR, method="GET", expiry=60, proxy_url="https://api.example.com/résumé?q=ü"),
    "proxy-ipv6-userinfo": dict(VECTOR, method="GET", expiry=60, proxy_url="http://user:p w@[::1]:8080/v1"),
    "proxy-backslash-and-whitespace": dict(
        VECTOR, method="GET", expiry=60, proxy_url=" https://api.example.com\\v1\\x?a=\\b \n"
    ),
    "now-with-offset": dict(VECTOR, method="GET", expiry=60, proxy_url=OPENAI, now=[NOV_20 + 3599, 7200]),
    "integer-like-expiry-and-id": dict(VECTOR, id="team/app é", method="GET", expiry=604800, proxy_url=OPENAI),
}


def python_sign(args: dict[str, Any]) -> str:
    args = dict(args)
    if "traceparent" in args:  # the Ruby keyword is the signed parameter pw_traceparent, after the others
        args["params"] = {**args.get("params", {}), "pw_traceparent": args.pop("traceparent")}
    epoch, offset = args.pop("now")
    when = datetime.fromtimestamp(epoch, timezone(timedelta(seconds=offset)))
    return sign_url(**args, datetime_override=when)


async def test_ruby_signer_matches_python_signer_byte_for_byte(tmp_path: Path) -> None:
    urls = await ruby_sign(tmp_path, list(TABLE.values()))
    mismatches = {
        name: (ruby_url, python_sign(args))
        for (name, args), ruby_url in zip(TABLE.items(), urls)
        if ruby_url != python_sign(args)
    }
    assert mismatches == {}
    for name, (_, golden) in GOLDEN.items():
        assert urls[list(TABLE).index(name)] == golden == python_sign(TABLE[name]), name


async def test_ruby_signer_refuses_what_it_cannot_normalise(tmp_path: Path) -> None:
    ruby = require_binary("ruby")
    script = tmp_path / "refuse.rb"
    script.write_text(
        "require ARGV.fetch(0)\n"
        "%w[ftp://x/ https://bücher.example/ http://h:99999/ mailto:a@b].each do |proxy|\n"
        "  begin\n"
        "    ParkwaySigner.sign_url(id: 'a', secret: 's', host: 'http://h', proxy_url: proxy, expiry: 1, method: 'GET')\n"
        '    puts "accepted #{proxy}"\n'
        "  rescue ParkwaySigner::InvalidURL => e\n"
        '    puts "refused #{e.message}"\n'
        "  end\n"
        "end\n"
    )
    with trio.fail_after(RUBY_TIMEOUT):
        result = await trio.run_process(
            [ruby, str(script), str(SIGNER_RB)], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 4 and all(line.startswith("refused ") for line in lines), lines
    assert "punycode" in lines[1]


# --- Ruby-signed URLs through a running Parkway ------------------------------------------------


def now_pair() -> list[int]:
    return [int(datetime.now(UTC).timestamp()), 0]


def live_cases(parkway: RunningParkway, upstream: Upstream, signer: str) -> dict[str, dict[str, Any]]:
    """Requests a Rails backend would sign for a browser, each with what the browser then sends."""
    common = dict(signer=signer, id="app", secret=SECRET, host=parkway.base, expiry=60, now=now_pair())
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "Grüße, ça va? 你好"}]}, ensure_ascii=False
    )
    cases = {
        "post-signed-json-body": dict(
            common,
            method="POST",
            proxy_url=f"{upstream.base}/v1/chat/completions",
            headers={"Content-Type": "application/json"},
            body=body,
        ),
        "get-proxy-query": dict(common, method="GET", proxy_url=f"{upstream.base}/v1/models?limit=2&order=desc"),
        "proxy-no-path": dict(common, method="GET", proxy_url=upstream.base),
        "proxy-dot-segments-and-quotes": dict(common, method="GET", proxy_url=f'{upstream.base}/v1/../v1/search?q="x"'),
        "host-with-path-behind-nginx": dict(
            common,
            method="POST",
            host=parkway.base + "/ai",
            proxy_url=f"{upstream.base}/v1/chat/completions",
            body="plain",
        ),
        "headers-sharing-a-prefix": dict(
            common,
            method="GET",
            proxy_url=f"{upstream.base}/v1/models",
            headers={"Accept": "application/json", "Accept-Language": "fr"},
        ),
    }
    if signer == "parkway":
        cases["extra-params"] = dict(
            common, method="GET", proxy_url=f"{upstream.base}/v1/models", params={"user": "alice smith"}
        )
        cases["traceparent"] = dict(
            common, method="GET", proxy_url=f"{upstream.base}/v1/models", traceparent=TRACEPARENT
        )
    return cases


async def send_as_browser(client, url: str, case: dict[str, Any]):
    headers = dict(case.get("headers") or {})
    body = case.get("body")
    return await client.request(
        case["method"], url, headers=headers, content=body.encode() if body is not None else None
    )


@pytest.mark.parametrize("signer", ["parkway", "gem"], ids=["parkway_signer.rb", "signway_sdk-gem-algorithm"])
async def test_parkway_accepts_ruby_signed_urls(
    tmp_path: Path, parkway: RunningParkway, upstream: Upstream, client, signer: str
) -> None:
    cases = live_cases(parkway, upstream, signer)
    urls = await ruby_sign(tmp_path, list(cases.values()))
    for (name, case), url in zip(cases.items(), urls):
        response = await send_as_browser(client, url, case)
        assert response.status_code == 200, (name, url, response.text)
        received = upstream.requests[-1]
        assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}", name
        if "body" in case:
            assert received.body == case["body"].encode(), name
    paths = [r.target for r in upstream.requests]
    assert paths[:4] == ["/v1/chat/completions", "/v1/models?limit=2&order=desc", "/", "/v1/search?q=%22x%22"]


@pytest.mark.parametrize("signer", ["parkway", "gem"], ids=["parkway_signer.rb", "signway_sdk-gem-algorithm"])
async def test_tampered_ruby_signed_urls_are_refused(
    tmp_path: Path, parkway: RunningParkway, upstream: Upstream, client, signer: str
) -> None:
    cases = live_cases(parkway, upstream, signer)
    urls = await ruby_sign(tmp_path, list(cases.values()))
    by_name = dict(zip(cases, urls))
    attempts = [
        # another upstream path than the one signed
        (by_name["get-proxy-query"].replace("limit%3D2", "limit%3D200"), cases["get-proxy-query"]),
        # the signed body changed by the browser
        (by_name["post-signed-json-body"], dict(cases["post-signed-json-body"], body='{"model":"gpt-4o"}')),
        # the signed Content-Type changed
        (
            by_name["post-signed-json-body"],
            dict(cases["post-signed-json-body"], headers={"Content-Type": "text/plain"}),
        ),
        # a signed URL for POST used with GET
        (by_name["host-with-path-behind-nginx"], dict(cases["host-with-path-behind-nginx"], method="PUT")),
    ]
    for url, case in attempts:
        response = await send_as_browser(client, url, case)
        assert response.status_code == 403, (url, response.text)
        assert response.json()["error"]["code"] == "signature_mismatch"
    assert upstream.requests == [] and upstream.connections == 0


# --- 2. the gem's algorithm, anchored against the Python SDK -----------------------------------


async def test_gem_algorithm_agrees_with_python_sdk_where_the_sdks_agree(tmp_path: Path) -> None:
    """Without bodies or headers the two SDKs sign alike: this anchors the Ruby restatement."""
    cases = [
        dict(VECTOR, method="POST", expiry=300, proxy_url=OPENAI),
        dict(VECTOR, method="GET", expiry=60, proxy_url="https://api.openai.com/v1/models?limit=2&order=desc"),
        dict(VECTOR, host="https://example.com/ai", method="GET", expiry=5, proxy_url="https://api.example.com/v1/x"),
    ]
    urls = await ruby_sign(tmp_path, [dict(c, signer="gem") for c in cases])
    for case, url in zip(cases, urls):
        args = dict(case)
        epoch, _ = args.pop("now")
        expected = signway_sdk.sign_url(**args, datetime_override=datetime.fromtimestamp(epoch, UTC))
        assert url == expected
    assert urls[0] == GOLDEN["post"][1]


@pytest.mark.parametrize("sdk", ["gem", "python-sdk"])
async def test_sdk_signed_headers_sharing_a_prefix_are_accepted(
    tmp_path: Path, parkway: RunningParkway, upstream: Upstream, client, sdk: str
) -> None:
    """Both SDKs sort header lines as "name:value" strings, so "accept-language:..." comes
    before "accept:..." ('-' < ':'); Parkway must verify what they actually sign."""
    case = dict(
        signer="gem",
        id="app",
        secret=SECRET,
        host=parkway.base,
        expiry=60,
        now=now_pair(),
        method="GET",
        proxy_url=f"{upstream.base}/v1/models",
        headers={"Accept": "text/event-stream", "Accept-Language": "fr"},
    )
    if sdk == "gem":
        (url,) = await ruby_sign(tmp_path, [case])
    else:
        url = signway_sdk.sign_url(
            id="app",
            secret=SECRET,
            host=parkway.base,
            proxy_url=case["proxy_url"],
            expiry=60,
            method="GET",
            headers=dict(case["headers"]),
            datetime_override=datetime.now(UTC),
        )
    response = await send_as_browser(client, url, case)
    assert response.status_code == 200, response.text
