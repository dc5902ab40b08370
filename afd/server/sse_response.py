"""A streaming response that notices a client disconnect while the engine is still busy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class SSEResponse(StreamingResponse):
    """`text/event-stream` body whose producer is cancelled as soon as the client leaves.

    Starlette only watches for `http.disconnect` under ASGI spec < 2.4; under 2.4 it waits
    for a failed send, which never comes while a request sits in prefill. Watching always
    makes the cancellation (and so the engine abort in the producer's `finally`) prompt.
    """

    def __init__(self, body: AsyncIterator[str]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(receive, send)
        finally:
            # A producer cancelled while suspended at `yield` is only finalised here; its
            # `finally` then aborts the engine request without waiting for the GC.
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()

    async def _serve(self, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream_then_stop() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-send
                group.cancel_scope.cancel()

            group.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
