"""``parkway demo --once`` plays the browser and then the background example (proxy.demo.jobs)."""

from __future__ import annotations

import trio

from proxy.demo.run import run_demo

HANG_LIMIT = 30.0


async def test_demo_runs_a_background_job_and_verifies_its_webhook(capsys, hang_guard) -> None:
    with trio.fail_after(25):
        code = await run_demo(0, once=True, delay=0.0)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "202 Accepted after" in out and '"status": "queued"' in out
    assert "signature verified: job.completed" in out
    assert "answer> Parkway verified the signed URL" in out
    # The same end user twice under a 150-token daily budget: the second cannot fit.
    assert "request 1: 200" in out and "request 2: 429 budget_exhausted, Retry-After" in out
