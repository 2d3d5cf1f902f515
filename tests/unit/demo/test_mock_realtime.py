"""proxy.demo.mock_realtime: the Realtime stand-in the browser example talks to by default.

A real trio-websocket client on loopback (support.websocket.ws_client); the browser test points its page at its own stand-in,
so this is the one test of the mock's own promises.
"""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionRejected

from proxy.demo.mock_realtime import ANSWER, MockRealtime
from support.websocket import ws_client

KEY = "sk-mock-realtime-test"
GUARD = 10.0  # seconds: loopback only, a hung mock fails the test


@pytest.fixture
async def mock(nursery: trio.Nursery) -> MockRealtime:
    return await nursery.start(MockRealtime(api_key=KEY, delay=0).serve)


async def test_a_wrong_key_is_refused_with_401(mock: MockRealtime) -> None:
    with trio.fail_after(GUARD), pytest.raises(ConnectionRejected) as refused:
        async with ws_client(mock.port, "/v1/realtime", headers=[(b"authorization", b"Bearer sk-wrong")]):
            pass
    assert refused.value.status_code == 401
    assert json.loads(refused.value.body)["type"] == "error"


async def test_a_response_streams_the_answer_then_usage_and_other_messages_echo(mock: MockRealtime) -> None:
    headers = [(b"authorization", f"Bearer {KEY}".encode())]
    with trio.fail_after(GUARD):
        async with ws_client(mock.port, "/v1/realtime", subprotocols=["realtime"], headers=headers) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.get_message())["type"] == "session.created"

            await ws.send_message(json.dumps({"type": "response.create"}))
            text = ""
            while (event := json.loads(await ws.get_message()))["type"] == "response.output_text.delta":
                text += event["delta"]
            assert text == ANSWER
            assert event["type"] == "response.done"
            assert event["response"]["usage"]["output_tokens"] == len(ANSWER.split(" "))

            await ws.send_message(b"\x00\x01audio")
            assert await ws.get_message() == b"\x00\x01audio"  # binary stays binary
            await ws.send_message('{"type":"input_audio_buffer.append"}')
            assert await ws.get_message() == '{"type":"input_audio_buffer.append"}'
