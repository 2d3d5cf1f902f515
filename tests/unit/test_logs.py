"""The JSON log line: every field, the bound request fields, the level, a UTC timestamp, secrets redacted."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import logs


def _line(**fields: object) -> dict[str, object]:
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        with structlog.contextvars.bound_contextvars(request_id="r1", credential="c1", user=None):
            structlog.get_logger("test").warning("request", **fields)
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    return json.loads(text)


def test_a_line_has_its_fields_the_bound_ones_the_level_and_a_utc_timestamp() -> None:
    before = time.time()
    line = _line(method="POST", status=200, duration_ms=0.6, thing=object())
    assert line["event"] == "request" and line["level"] == "warning"
    assert (line["method"], line["status"], line["duration_ms"]) == ("POST", 200, 0.6)
    assert (line["request_id"], line["credential"], line["user"]) == ("r1", "c1", None)
    assert str(line["thing"]).startswith("<object object")  # repr of what JSON cannot carry
    stamp = str(line["timestamp"])
    assert stamp.endswith("Z") and len(stamp) == len("2026-12-07T00:37:23.618191Z")
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert when.tzinfo is not None and when.utcoffset() == UTC.utcoffset(None)
    assert before - 1 <= when.timestamp() <= time.time() + 1


def test_secret_keys_are_redacted_whatever_their_case() -> None:
    line = _line(
        api_key="sk-1",
        Authorization="Bearer sk-2",
        headers={"authorization": "x"},
        refresh_token="t",
        webhook_secret="w",
        signature="0123456789abcdef",
        password="p",
        secretive="kept",
    )
    for key in ("api_key", "Authorization", "headers", "refresh_token", "webhook_secret", "password"):
        assert line[key] == "[redacted]", key
    assert line["signature"] == "01234567…"
    assert line["secretive"] == "kept"
    assert "sk-1" not in json.dumps(line) and "sk-2" not in json.dumps(line)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


class _Repr:
    def __repr__(self) -> str:
        return "<repr \u00e9>"


class _Structlog:
    def __structlog__(self) -> str:
        return "structlog form"


@given(st.dictionaries(st.text(max_size=8), _JSON_VALUES | st.sampled_from([_Repr(), _Structlog()]), max_size=6))
@settings(max_examples=300, deadline=None)
def test_json_lines_are_what_the_json_encoder_writes(event_dict) -> None:
    """The encoder made once (logs._json_encoder) writes what json.JSONEncoder writes, line for line."""
    assert logs._render_json(None, "info", event_dict) == json.JSONEncoder(default=logs._json_default).encode(
        event_dict
    )


def test_a_secret_key_is_redacted_on_every_line_not_only_the_first() -> None:
    """Keys found plain are remembered; a secret one never is, so a later line is redacted too."""
    for _ in range(3):
        line = _line(method="GET", api_key="sk-1", status=200)
        assert line["api_key"] == "[redacted]" and line["method"] == "GET"


def test_an_exception_line_carries_its_traceback_as_text() -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("test").exception("internal_error")
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["level"] == "error" and "exc_info" not in line
    assert "ValueError: boom" in line["exception"]


@given(st.dictionaries(st.sampled_from(["request_id", "credential", "user", "job", "w"]), st.none() | st.text(max_size=4)),
       st.sets(st.sampled_from(["request_id", "credential", "user", "job", "w"])))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_the_bound_fields_merged_are_structlogs_own_merge(bound: dict[str, object], unbound: set[str]) -> None:
    """logs merges the bound fields reading structlog's variables; the fields are those of
    ``merge_contextvars``, bound, rebound, unbound or never bound in this context."""
    merge = logs._context_merger()
    assert merge is not structlog.contextvars.merge_contextvars  # this structlog keeps them where logs reads them

    def both() -> tuple[dict[str, object], dict[str, object]]:
        return (
            dict(merge(None, "info", {"event": "x", "user": "caller's"})),
            dict(structlog.contextvars.merge_contextvars(None, "info", {"event": "x", "user": "caller's"})),
        )

    def run() -> None:
        structlog.contextvars.bind_contextvars(**bound)
        structlog.contextvars.unbind_contextvars(*unbound)
        ours, theirs = both()
        assert ours == theirs
        structlog.contextvars.bind_contextvars(fresh_key_in_test=1)  # a variable created after the first line
        ours, theirs = both()
        assert ours == theirs and ours["fresh_key_in_test"] == 1

    contextvars.copy_context().run(run)


def test_the_level_is_structlogs() -> None:
    """warn is warning, exception is error, as structlog's add_log_level names them."""
    stamp = logs._stamper()
    for method in ("debug", "info", "warn", "warning", "error", "exception", "critical"):
        assert stamp(None, method, {})["level"] == structlog.processors.add_log_level(None, method, {})["level"]


def _bound() -> dict[str, object]:
    return dict(structlog.contextvars.merge_contextvars(None, "info", {}))


@given(st.dictionaries(st.sampled_from(["request_id", "credential", "user", "job", "w"]), st.none() | st.text(max_size=4)),
       st.none() | st.text(max_size=4), st.none() | st.text(max_size=4))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_a_requests_fields_are_bound_and_reset_as_structlogs_bind_and_reset_do(
    before: dict[str, object], credential: str | None, user: str | None
) -> None:
    """RequestFields sets structlog's own variables: merge_contextvars sees what bind_contextvars
    would have bound, and the reset puts back what was bound before (or unbinds)."""
    fields = logs.RequestFields()
    assert fields.direct  # this structlog keeps its variables where logs reads them

    def run(bind: object) -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
        structlog.contextvars.bind_contextvars(**before)
        tokens = bind("r1")  # type: ignore[operator]
        fresh = _bound()
        if isinstance(tokens, tuple):
            fields.credential(credential)
            fields.user(user)
        else:
            structlog.contextvars.bind_contextvars(credential=credential)
            structlog.contextvars.bind_contextvars(user=user)
        later = _bound()
        fields.reset(tokens) if isinstance(tokens, tuple) else structlog.contextvars.reset_contextvars(**tokens)
        return fresh, later, _bound()

    ours = contextvars.copy_context().run(run, fields.bind)
    theirs = contextvars.copy_context().run(
        run, lambda rid: structlog.contextvars.bind_contextvars(request_id=rid, credential=None, user=None, job=None)
    )
    assert ours == theirs
    fresh, later, after = ours
    assert fresh == {**before, "request_id": "r1", "credential": None, "user": None, "job": None}
    assert (later["credential"], later["user"]) == (credential, user)
    assert after == before


def test_without_structlogs_variables_a_requests_fields_use_its_bind_and_reset(monkeypatch) -> None:
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", None, raising=False)
    fields = logs.RequestFields()
    monkeypatch.undo()
    assert not fields.direct

    def run() -> None:
        tokens = fields.bind("r2")
        fields.credential("c2")
        fields.user("u2")
        assert _bound() == {"request_id": "r2", "credential": "c2", "user": "u2", "job": None}
        fields.reset(tokens)
        assert _bound() == {}

    contextvars.copy_context().run(run)


@given(
    st.sampled_from(["debug", "info", "warning", "warn", "error", "critical", "fatal", "msg", "exception"]),
    st.sampled_from(["debug", "info", "warning", "error"]),
    st.dictionaries(st.sampled_from(["a", "event_x", "user", "level"]), st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(["b", "user", "method"]), st.none() | st.text(max_size=3), max_size=3),
    st.sampled_from([(), ("x",), ({"k": 1},)]),
)
@settings(max_examples=200, deadline=None)
def test_the_bound_logger_hands_the_processors_and_the_logger_what_structlogs_does(
    method: str, level: str, context: dict[str, object], kw: dict[str, object], args: tuple[object, ...]
) -> None:
    """logs' bound logger class runs the chain itself: the same event dicts (bound context, keywords,
    event, in that order), the same method names, the same calls on the logger, at every level."""
    min_level = logging.getLevelNamesMapping()[level.upper()]

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: self.calls.append((name, (a, k)))

    def run(cls: Any) -> tuple[list[object], list[tuple[str, object]]]:
        seen: list[object] = []

        def processor(_logger: object, name: str, event_dict: dict[str, object]) -> object:
            seen.append((name, list(event_dict.items())))
            return {"dict": dict(event_dict)} if name == "info" else json.dumps(list(event_dict), default=str)

        recorder = Recorder()
        logger = cls(recorder, processors=[processor], context=dict(context))
        event = "e %s" if args else "e"
        getattr(logger, method)(event, *args, **kw)
        return seen, recorder.calls

    assert run(logs._bound_logger_class(min_level)) == run(structlog.make_filtering_bound_logger(min_level))


def test_a_dropped_event_writes_nothing() -> None:
    calls: list[object] = []

    def drop(*_: object) -> object:
        raise structlog.DropEvent

    logger = logs._bound_logger_class(logging.INFO)(calls, processors=[drop], context={})
    assert logger.info("x", a=1) is None and calls == []


@given(st.dictionaries(st.sampled_from(["event", "method", "api_key", "signature", "Password", "n", "exc_info"]),
                       st.none() | st.text(max_size=10) | st.integers()))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_a_json_lines_one_processor_writes_what_the_stamp_and_the_renderer_write(event_dict: dict[str, Any]) -> None:
    frozen = time.time()
    real, time.time = time.time, lambda: frozen  # type: ignore[assignment]
    try:
        one = logs._stamper(json_lines=True)(None, "warning", dict(event_dict))
        two = logs._render_json(None, "warning", logs._stamper()(None, "warning", dict(event_dict)))
    finally:
        time.time = real  # type: ignore[assignment]
    assert one == two


class _Writes(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _configured(stream: Any) -> Any:
    logs.configure("info", "json", stream)
    return structlog.get_logger("test").bind()


def test_a_turns_lines_are_written_together_in_order_in_pieces_no_larger_than_pipe_buf() -> None:
    out = _Writes()
    log = _configured(out)
    try:

        async def main() -> None:
            for i in range(40):  # about 6 KB: two writes
                log.info("line", i=i, pad="x" * 100)
            assert out.writes == []  # held until the loop waits
            await trio.sleep(0)
            assert len(out.writes) == 2

        with logs.turn_batches() as instruments:
            trio.run(main, instruments=instruments)
    finally:
        structlog.reset_defaults()
    assert all(len(w.encode()) <= logs.PIPE_BUF and w.endswith("\n") for w in out.writes)
    assert [json.loads(line)["i"] for line in out.getvalue().splitlines()] == list(range(40))


def test_a_line_is_out_before_the_loop_waits_for_io() -> None:
    """The hook is the loop's own wait: a task waiting on the pipe the line goes to is woken by it."""
    read_fd, write_fd = os.pipe()
    stream = io.TextIOWrapper(io.FileIO(write_fd, "w"), write_through=True)
    log = _configured(stream)
    try:

        async def main() -> None:
            log.warning("prompt")
            with trio.fail_after(30):
                await trio.lowlevel.wait_readable(read_fd)
            assert b'"event": "prompt"' in os.read(read_fd, 65536)

        with logs.turn_batches() as instruments:
            trio.run(main, instruments=instruments)
    finally:
        structlog.reset_defaults()
        stream.close()
        os.close(read_fd)


def test_lines_waiting_when_a_run_fails_are_written_and_other_threads_write_at_once() -> None:
    out = _Writes()
    log = _configured(out)
    try:

        async def main() -> None:
            def in_thread() -> None:
                log.info("from_thread")
                assert "from_thread" in out.getvalue()  # not held for the Trio thread's turn

            await trio.to_thread.run_sync(in_thread)
            log.error("last_words")
            raise ValueError("boom")

        with pytest.raises(ValueError), logs.turn_batches() as instruments:
            trio.run(main, instruments=instruments)
        assert "last_words" in out.getvalue()
        log.info("after")  # not batching any more: written at once
        assert json.loads(out.getvalue().splitlines()[-1])["event"] == "after"
    finally:
        structlog.reset_defaults()


def test_a_failed_write_ends_the_batching() -> None:
    class Failing(_Writes):
        fail = True

        def write(self, text: str) -> int:
            if self.fail:
                self.fail = False
                raise BlockingIOError
            return super().write(text)

    out = Failing()
    log = _configured(out)
    try:
        with logs.turn_batches():
            log.info("lost")
            with pytest.raises(BlockingIOError):
                logs._writer.flush()  # type: ignore[union-attr]
            log.info("kept")
            assert "kept" in out.getvalue()
    finally:
        structlog.reset_defaults()


def test_console_lines_are_not_batched() -> None:
    logs.configure("info", "console", io.StringIO())
    try:
        with logs.turn_batches() as instruments:
            assert instruments == []
    finally:
        structlog.reset_defaults()
