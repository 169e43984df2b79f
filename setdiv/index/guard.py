"""What stands between clients and the search app: the Host header, body framing and size
(411 / 413 / 415), at most `MAX_IN_FLIGHT` requests in the server, a deadline per request
(408 / 503), a timeout for a connection's first request head, a JSON {"error": ...} for a
request uvicorn cannot parse, and log lines that escape what clients sent."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import h11
from fastapi.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "DEADLINE_KEY",
    "DEADLINE_S",
    "HEAD_TIMEOUT_S",
    "MAX_BODY",
    "MAX_IN_FLIGHT",
    "Guard",
    "HeadTimeoutH11",
    "error_response",
    "escape",
]

log = logging.getLogger("setdiv.index.serve")  # (one log for the service: tests read it)

MAX_BODY = 8 << 20
"""Largest request body (bytes): a batch of a few JPEGs."""
DEADLINE_S = 30.0
DEADLINE_KEY = "setdiv.deadline"
"""The scope key under which the app finds its request's deadline (time.monotonic())."""
MAX_IN_FLIGHT = 64
HEAD_TIMEOUT_S = 10.0


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one error shape: {"error": message, **extra} with `status` and `headers`."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def escape(text: str) -> str:
    """`text` with control and non-ASCII characters escaped, for one log line."""
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class Guard:
    """ASGI middleware: Host check, body size and framing, the in-flight bound, the whole-
    request deadline and one escaped log line per request."""

    def __init__(self, app: Any, allowed_hosts: set[str] | None) -> None:
        self.app, self.allowed_hosts = app, allowed_hosts
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.monotonic(), {"status": 0}

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send_logged)
            if self.in_flight >= MAX_IN_FLIGHT:
                busy = error_response(503, "busy: too many requests in flight")
                busy.headers["Retry-After"] = "1"
                return await busy(scope, receive, send_logged)
            self.in_flight += 1
            try:
                await self._run(scope, receive, send_logged, start + DEADLINE_S, state)
            finally:
                self.in_flight -= 1
        finally:
            client = scope.get("client") or ("-", 0)
            raw = scope.get("raw_path") or scope["path"].encode()
            log.info(
                '%s "%s %s" %d %.0f ms',
                client[0],
                escape(scope["method"]),
                escape(raw.decode("latin-1")),
                state["status"],
                1000 * (time.monotonic() - start),
            )

    def _refusal(self, scope: dict) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.allowed_hosts is not None and name.strip("[]") not in self.allowed_hosts:
            return error_response(400, f"unknown Host {escape(host)!r} (--allowed-host)")
        if scope["method"] != "POST":
            return None
        length = headers.get("content-length")
        if length is None and "chunked" not in headers.get("transfer-encoding", ""):
            return error_response(411, "a Content-Length is required")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return error_response(413, f"bodies are limited to {MAX_BODY} bytes")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["path"] == "/search" and ctype != "application/json":
            return error_response(415, "send application/json")
        return None

    async def _run(
        self, scope: dict, receive: Callable, send: Callable, deadline: float, state: dict
    ) -> None:
        """The app under the deadline. A body over `MAX_BODY` (chunked: only seen arriving) or
        late is answered 413 / 408 here, whatever the app made of the failed read (FastAPI
        calls any failure to read a body a 400)."""
        received, body_done = 0, False
        late: list[_LateError] = []
        scope[DEADLINE_KEY] = deadline

        async def bounded_receive() -> dict:
            nonlocal received, body_done
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except TimeoutError:
                late.append(_LateError(408, "the request body did not arrive in time"))
                raise late[-1] from None
            received += len(message.get("body", b""))
            body_done = body_done or not message.get("more_body", False)
            if received > MAX_BODY:
                late.append(_LateError(413, f"bodies are limited to {MAX_BODY} bytes"))
                raise late[-1]
            return message

        async def app_send(message: dict) -> None:
            if not late:  # the app's answer to a body it did not get is not sent
                await send(message)

        try:
            await asyncio.wait_for(
                self.app(scope, bounded_receive, app_send), timeout=deadline - time.monotonic()
            )
        except (_LateError, TimeoutError) as exc:
            if not isinstance(exc, _LateError) and not late:
                body_missing = scope["method"] == "POST" and not body_done
                late.append(
                    _LateError(408, "the request body did not arrive in time")
                    if body_missing
                    else _LateError(503, "no answer within the request deadline")
                )
        if late and state["status"] == 0:  # nothing sent yet: say why
            await error_response(late[0].status, str(late[0]))(scope, receive, send)


class _LateError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections that send no complete request head in
    `HEAD_TIMEOUT_S` (uvicorn itself waits forever for one)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._drop_if_silent)

    def _drop_if_silent(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as JSON {"error": ...}."""
        body = json.dumps({"error": msg}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body)):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()
