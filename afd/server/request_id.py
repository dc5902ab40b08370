"""The `X-Request-Id` header (vLLM's --enable-request-id-headers, always on): the client's id,
or a fresh one, is checked, put on `request.state.request_id` and echoed on the response."""

from __future__ import annotations

import uuid

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afd.server.errors import BadRequestError, error_response, to_api_error

HEADER = "X-Request-Id"
MAX_LENGTH = 256


class RequestIdMiddleware:
    """Pure ASGI, so streamed bodies and disconnect notices pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        problem = _problem(raw)
        if problem is not None:
            await error_response(BadRequestError(problem, param=HEADER))(scope, receive, send)
            return
        # Empty counts as absent, as in vLLM; the id then comes from us.
        request_id = raw.decode("ascii") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # An error no route turned into a response would reach Starlette's outermost
            # handler, past this middleware: answer it here so the 500 carries the id too.
            if started:
                raise
            await error_response(to_api_error(exc))(scope, receive, send_with_id)


def request_id_of(raw: Request) -> str:
    """This request's id (the client's X-Request-Id or a fresh one), unique only if the client
    makes it so: the engine gets its own unique id per request (EngineStreams.stream)."""
    return raw.state.request_id


def _problem(value: bytes) -> str | None:
    """What is wrong with the header's value, as the 400's message; None if nothing."""
    rule = f"it must be at most {MAX_LENGTH} printable ASCII characters"
    if len(value) > MAX_LENGTH:
        return f"The {HEADER} header is {len(value)} characters long; {rule}"
    bad = next((i for i, b in enumerate(value) if not 0x20 <= b <= 0x7E), None)
    if bad is not None:
        return f"The {HEADER} header has a non-printable-ASCII character at position {bad}; {rule}"
    return None
