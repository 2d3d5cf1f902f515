"""The admin listener: health, readiness, Prometheus metrics and reload, on its own address.

It runs on the same HTTP server module as the public listener, but never sees public
traffic; keep it on loopback or a private network (it has no authentication).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from .errors import ParkwayError, error_response
from .http.connection import HTTPConnection, RequestHead
from .metrics import CONTENT_TYPE


class Operable(Protocol):
    """What the admin endpoints need from a running Parkway."""

    @property
    def metrics(self) -> object: ...

    async def readiness(self) -> dict[str, bool]: ...

    def reload(self) -> list[str]: ...


def _json(status: int, payload: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return (
        status,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ],
        body,
    )


class AdminApp:
    def __init__(self, parkway: Operable, render_metrics: Callable[[], bytes]):
        self.parkway = parkway
        self.render_metrics = render_metrics

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        await conn.send_full(*error_response(exc, head_only=conn.head_only))

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        async for _ in conn.body_chunks():
            pass
        route = ("GET" if head.method == "HEAD" else head.method, head.path)  # HEAD: GET's head, no body
        if route == ("GET", "/healthz"):
            response = _json(200, {"status": "ok"})
        elif route == ("GET", "/readyz"):
            checks = await self.parkway.readiness()
            ready = all(checks.values())
            response = _json(200 if ready else 503, {"ready": ready, "checks": checks})
        elif route == ("GET", "/metrics"):
            body = self.render_metrics()
            response = (
                200,
                [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())],
                body,
            )
        elif route == ("POST", "/reload"):
            problems = self.parkway.reload()
            response = (
                _json(200, {"reloaded": True})
                if not problems
                else _json(400, {"reloaded": False, "problems": problems})
            )
        else:
            response = _json(
                404,
                {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "not_found",
                        "message": f"no admin endpoint {head.method} {head.path}",
                    }
                },
            )
        status, headers, body = response
        await conn.send_full(status, headers, b"" if conn.head_only else body)
