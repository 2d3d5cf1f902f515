"""clients/ruby/parkway_webhook.rb, run with Debian's ``ruby``: it accepts what Parkway and the
``standardwebhooks`` package sign, and refuses tampered, stale and wrongly signed deliveries."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from standardwebhooks.webhooks import Webhook

from proxy.jobs import webhooks
from support.processes import ROOT, require_binary

VERIFIER_RB = ROOT / "clients" / "ruby" / "parkway_webhook.rb"
RUBY_TIMEOUT = 20.0

# Reads a JSON array of {body, headers, secret, rack?} on stdin; prints one line per case:
# "ok <payload type>" or "refused <message>".
TABLE_RB = r"""
require "json"
require ARGV.fetch(0)
JSON.parse($stdin.read).each do |c|
  headers = c["headers"]
  headers = headers.to_h { |k, v| ["HTTP_#{k.upcase.tr('-', '_')}", v] } if c["rack"]
  begin
    payload = ParkwayWebhook.verify!(c["body"], headers, c["secret"])
    puts "ok #{payload['type']}"
  rescue ParkwayWebhook::VerificationError => e
    puts "refused #{e.message}"
  end
end
"""

OLD = bytes(range(32))
NEW = bytes(range(50, 82))
BODY = json.dumps(
    {"type": "job.completed", "data": {"id": "job_x", "status": "completed", "t": "Grüße"}}, ensure_ascii=False
)


def case(
    body: str = BODY,
    *,
    keys: tuple[bytes, ...] = (OLD,),
    secret: Any = None,
    ts: int | None = None,
    rack: bool = False,
    drop: str | None = None,
    send: str | None = None,
) -> dict[str, Any]:
    stamp = int(time.time()) if ts is None else ts
    headers = dict(webhooks.headers(list(keys), "msg_1", stamp, body.encode()))
    if drop:
        del headers[drop]
    return {
        "body": send if send is not None else body,
        "headers": headers,
        "rack": rack,
        "secret": secret if secret is not None else webhooks.format_secret(OLD),
    }


async def run_ruby(tmp_path: Path, cases: list[dict[str, Any]]) -> list[str]:
    ruby = require_binary("ruby")
    script = tmp_path / "verify_table.rb"
    script.write_text(TABLE_RB)
    with trio.fail_after(RUBY_TIMEOUT):
        result = await trio.run_process(
            [ruby, "-W0", str(script), str(VERIFIER_RB)],
            stdin=json.dumps(cases).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(cases)
    return lines


async def test_ruby_verifier_accepts_and_refuses(tmp_path: Path) -> None:
    now = int(time.time())
    library_signature = Webhook(webhooks.format_secret(OLD)).sign("msg_1", datetime.fromtimestamp(now, UTC), BODY)
    from_library = {
        "body": BODY,
        "rack": False,
        "secret": webhooks.format_secret(OLD),
        "headers": {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": library_signature},
    }
    table = {
        "parkway-signed": (case(), "ok job.completed"),
        "rotation-old-secret": (case(keys=(OLD, NEW)), "ok job.completed"),
        "rotation-new-secret": (case(keys=(OLD, NEW), secret=webhooks.format_secret(NEW)), "ok job.completed"),
        "receiver-holds-both": (
            case(keys=(NEW,), secret=[webhooks.format_secret(OLD), webhooks.format_secret(NEW)]),
            "ok job.completed",
        ),
        "rack-env-headers": (case(rack=True), "ok job.completed"),
        "unprefixed-secret": (case(secret=webhooks.format_secret(OLD)[6:]), "ok job.completed"),
        "library-signed": (from_library, "ok job.completed"),
        "tampered-body": (case(send=BODY.replace("completed", "failed")), "refused no webhook-signature matches"),
        "old-timestamp": (case(ts=now - 301), "refused webhook-timestamp is more than 300 s old"),
        "future-timestamp": (case(ts=now + 400), "refused webhook-timestamp is more than 300 s in the future"),
        "other-secret": (case(keys=(NEW,)), "refused no webhook-signature matches"),
        "missing-signature": (case(drop="webhook-signature"), "refused missing webhook-id"),
    }
    lines = await run_ruby(tmp_path, [c for c, _ in table.values()])
    mismatches = {name: line for name, line in zip(table, lines) if not line.startswith(table[name][1])}
    assert mismatches == {}
