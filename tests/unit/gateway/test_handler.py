"""Request ids: 16 hex digits, never repeated within a process, across its counter's wrap, or in a fork.
A request's log line and metrics are made once its answer is out, when the loop next sleeps."""

from __future__ import annotations

import io
import json
import os
import string
from typing import Any

import structlog
import trio

from proxy import logs
from proxy.gateway.handler import _RequestIds
from support.http import call
from support.parkway import make_config, run_parkway
from support.upstream import Upstream


def test_ids_are_16_hex_digits_and_distinct() -> None:
    ids = _RequestIds()
    drawn = [ids() for _ in range(10_000)]
    assert all(len(i) == 16 and set(i) <= set(string.hexdigits.lower()) for i in drawn)
    assert len(set(drawn)) == len(drawn)


def test_a_wrapped_counter_draws_a_new_prefix() -> None:
    ids = _RequestIds()
    first = ids()
    ids._next = 1 << 24  # as after 16.7 million requests
    after = ids()
    assert after[:10] != first[:10] and after.endswith("000000")


def test_a_forked_child_draws_its_own_prefix() -> None:
    ids = _RequestIds()
    parent = ids()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child[:10] != parent[:10] and child != ids()


def _requests_counted(metrics: Any) -> float:
    return sum(s.value for s in metrics.requests.collect()[0].samples if s.name == "parkway_requests_total")


def test_a_requests_line_and_metrics_are_made_after_its_answer_is_out_when_the_loop_sleeps() -> None:
    """With the CLI's batching on: when ``handle`` returns (the answer written), neither is made
    yet (a keep-alive client's next request would not wait for them); once the loop sleeps, both
    are, with the request's own fields."""
    out = io.StringIO()
    logs.configure("info", "json", out)
    # Parkway's module loggers, used here, must not keep this configuration for later tests.
    structlog.configure(cache_logger_on_first_use=False)
    at_return: list[tuple[bool, float]] = []
    try:

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                upstream = await nursery.start(Upstream().serve)
                running = await run_parkway(nursery, make_config())
                gateway = running.parkway.gateway
                assert gateway is not None
                handle = gateway.handle

                async def handled(head: Any, conn: Any) -> None:
                    await handle(head, conn)
                    made = [*(logs._writer._pending or ()), out.getvalue()]  # type: ignore[union-attr]
                    at_return.append(
                        (any('"event": "request"' in text for text in made), _requests_counted(gateway.metrics))
                    )

                gateway.handle = handled  # type: ignore[method-assign]
                reply = await call(running.port, "GET", running.sign(f"http://{upstream.netloc}/v1/models"))
                assert reply.status == 200
                with trio.fail_after(10):
                    while not at_return:
                        await trio.sleep(0.01)
                await trio.sleep(0.01)  # the loop sleeps: what was left runs first
                assert at_return == [(False, 0.0)]
                assert _requests_counted(gateway.metrics) == 1.0
                lines = [json.loads(line) for line in out.getvalue().splitlines()]
                line = next(entry for entry in lines if entry["event"] == "request")
                assert (line["status"], line["outcome"], line["credential"]) == (200, "ok", "app")
                assert len(line["request_id"]) == 16 and line["upstream_path"] == "/v1/models"
                running.parkway.shutdown()
                with trio.fail_after(10):
                    await running.stopped.wait()
                nursery.cancel_scope.cancel()  # the upstream

        with logs.turn_batches() as instruments:
            trio.run(main, instruments=instruments)
    finally:
        structlog.reset_defaults()
