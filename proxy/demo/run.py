"""``parkway demo``: the whole story on loopback, with no internet and no API key.

A mock OpenAI-style upstream that demands a key, Parkway holding that key for credential
``demo``, and a URL signed for the browser. ``--once`` plays the browser itself and shows
the answer arriving word by word.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shlex
import shutil
import socket
import sys
import tempfile

import httpx2 as httpx
import trio

from ..app import Parkway
from ..config import AdminConfig, Config, CorsConfig, Credential, ServerConfig
from ..jobs import webhooks
from ..jobs.model import JobsConfig
from ..limits import BudgetSpec
from ..signing import sign_url
from .jobs import DemoReceiver, play_background, serve_receiver
from .mock_openai import MockOpenAI, serve_mock

DEMO_BODY = {
    "model": "mock-gpt",
    "stream": True,
    "messages": [{"role": "user", "content": "What does Parkway do?"}],
}


def _out(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


async def _play_browser(url: str) -> int:
    """POST the signed URL and print each SSE event's text as it arrives; exit code 0 on success."""
    started = trio.current_time()
    first: float | None = None
    events = 0
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        async with client.stream("POST", url, json=DEMO_BODY) as response:
            if response.status_code != 200:
                _out(f"unexpected status {response.status_code}: {(await response.aread()).decode()}")
                return 1
            _out("  assistant> ", end="")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events += 1
                if first is None:
                    first = trio.current_time() - started
                delta = json.loads(line[6:])["choices"]
                if delta and "content" in delta[0]["delta"]:
                    _out(delta[0]["delta"]["content"], end="")
    total = trio.current_time() - started
    _out()
    first = total if first is None else first
    _out(
        f"\n  {events} SSE events; first after {first * 1000:.0f} ms, last after {total * 1000:.0f} ms:"
        " the answer streamed through Parkway as the upstream produced it."
    )
    return 0


BUDGET_BODY = {"model": "mock-gpt", "max_tokens": 40, "messages": [{"role": "user", "content": "Hello again"}]}


async def _play_budget(url: str) -> int:
    """Two requests of one end user against a tiny daily budget: the second cannot fit."""
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        for attempt in (1, 2):
            response = await client.post(url, json=BUDGET_BODY)
            if response.status_code == 200:
                used = response.json()["usage"]["total_tokens"]
                _out(f"  request {attempt}: 200, {used} tokens used   RateLimit: {response.headers.get('ratelimit')}")
            elif response.status_code == 429 and response.json()["error"]["code"] == "budget_exhausted":
                _out(f"  request {attempt}: 429 budget_exhausted, Retry-After {response.headers['retry-after']} s")
                _out(f"    {response.json()['error']['message']}")
                return 0 if attempt == 2 else 1
            else:
                _out(f"unexpected status {response.status_code}: {response.text}")
                return 1
    _out("  the budget was not exhausted")
    return 1


def _free_port() -> int:
    """A loopback port nobody listens on now (the demo's default: any free port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run_demo(port: int, once: bool, delay: float) -> int:
    api_key = "sk-demo-" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(24)
    hook_key = secrets.token_bytes(32)
    receiver = DemoReceiver(hook_key)
    async with trio.open_nursery() as nursery:
        upstream_url = await nursery.start(serve_mock, MockOpenAI(api_key=api_key, delay=delay))
        receiver_url = await nursery.start(serve_receiver, receiver)
        jobs_dir = tempfile.mkdtemp(prefix="parkway-demo-")
        port = port or _free_port()  # job URLs are built from the configured public_url: known before listening
        config = Config(
            server=ServerConfig(listen=(f"127.0.0.1:{port}",), drain_timeout=2.0),
            credentials=(
                Credential(
                    id="demo",
                    secrets=(secret,),
                    headers=(("Authorization", f"Bearer {api_key}"),),
                    allowed_upstreams=(upstream_url + "/v1/",),
                    allowed_callbacks=(receiver_url + "/hooks/",),
                    webhook_secrets=(webhooks.format_secret(hook_key),),
                ),
                Credential(  # each end user may spend 150 tokens a day (docs/budgets.md)
                    id="demo-budget",
                    secrets=(secret,),
                    headers=(("Authorization", f"Bearer {api_key}"),),
                    allowed_upstreams=(upstream_url + "/v1/",),
                    user_budget=BudgetSpec(150, "tokens", "day"),
                ),
            ),
            cors=CorsConfig(),
            admin=AdminConfig(listen=()),
            jobs=JobsConfig(
                enabled=True,
                public_url=f"http://127.0.0.1:{port}",
                path=os.path.join(jobs_dir, "jobs.sqlite3"),
                poll_interval=0.2,
            ),
        )
        parkway = Parkway(config)
        addresses = await nursery.start(parkway.run)
        base = f"http://{addresses[0]}"
        sign_completion = functools.partial(
            sign_url, id="demo", secret=secret, host=base, proxy_url=upstream_url + "/v1/chat/completions"
        )
        url = sign_completion(expiry=600, method="POST")
        _out("Parkway demo (everything on loopback)")
        _out(f"  mock upstream  {upstream_url}   OpenAI-style; demands an API key the browser never sees")
        _out(f"  parkway        {base}   credential 'demo' injects 'Authorization: Bearer sk-demo-…'")
        _out()
        _out("A backend signed this URL for the browser (valid 10 minutes, POST only):")
        _out(f"  {url}")
        _out()
        curl = f"curl -N -X POST {shlex.quote(url)} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(DEMO_BODY))}"
        background = sign_completion(expiry=600, method="POST", params={"pw_callback": receiver_url + "/hooks/summary"})
        if once:
            _out("Sending it, as the browser would:")
            code = await _play_browser(url)
            _out()
            _out("In the background, as a Sidekiq job would (the backend signs pw_callback; Parkway calls back):")
            code = code or await play_background(background, receiver, _out)
            _out()
            _out("Under a budget of 150 tokens a day per end user (user_budget), the same user twice:")
            budgeted = sign_url(
                id="demo-budget", secret=secret, host=base, proxy_url=upstream_url + "/v1/chat/completions",
                expiry=600, method="POST", params={"pw_user": "demo-user"},
            )  # fmt: skip
            code = code or await _play_budget(budgeted)
            _out()
            _out(f"To keep it running and stream it with curl yourself: {_command()} demo")
            parkway.shutdown()
            nursery.cancel_scope.cancel()
            shutil.rmtree(jobs_dir, ignore_errors=True)
            return code
        _out("Stream it with curl (Ctrl-C here stops the demo):")
        _out(f"  {curl}")
        _out()
        _out("Or run it in the background: 202 at once, the signed result POSTed to the demo's receiver:")
        _out(f"  curl -i -X POST {shlex.quote(background)} -H 'Content-Type: application/json' -d '{{}}'")
        nursery.start_soon(_stop_on_signal, parkway, nursery.cancel_scope)
    return 0


async def _stop_on_signal(parkway: Parkway, scope: trio.CancelScope) -> None:
    import signal

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            _out("\nstopping", end="\n")
            scope.cancel()
            return


def _command() -> str:
    """The ``parkway`` this process runs as (``.venv/bin/parkway`` in a checkout made by ``make``,
    wherever pip put it for an installed wheel), for the hint to run the demo again."""
    script = sys.argv[0]
    if os.path.basename(script) != "parkway":
        return "parkway"
    relative = os.path.relpath(script)
    return shlex.quote(script if relative.startswith("..") else relative)
