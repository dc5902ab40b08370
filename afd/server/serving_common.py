"""What chat and completions serving share: model lookup, sampling parameters, the context
length check, engine streams that abort on early exit, and SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel

from afd.outputs import RequestOutput
from afd.sampling_params import SamplingParams
from afd.server.engine_client import EngineClient, EngineError
from afd.server.errors import APIError, BadRequestError, NotFoundError, error_body, to_api_error
from afd.server.logprobs import LogprobFormatter
from afd.server.metrics import ServerMetrics
from afd.server.prompts import PromptBuilder
from afd.server.protocol import SamplingFields
from afd.server.settings import ServerSettings

T = TypeVar("T")
logger = logging.getLogger(__name__)
ABORT_TIMEOUT_S = 5.0
DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel) -> str:
    # Unset optional fields are left out, explicit nulls (finish_reason) kept, as vLLM does.
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def sse_error(exc: BaseException) -> str:
    err = to_api_error(exc)
    body = error_body(err.message, err.error_type, int(err.status), err.param)
    return f"data: {json.dumps(body)}\n\n"


class Serving:
    """Base of the chat and completions handlers."""

    def __init__(self, engine: EngineClient, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_names = settings.served_model_names or (engine.model_name,)
        self.prompts = PromptBuilder(engine.tokenizer, settings.chat_template)
        self.metrics = ServerMetrics(self.model_names[0])
        self.logprobs = LogprobFormatter(engine.tokenizer)

    def resolve_model(self, name: str | None) -> str:
        if not name:
            return self.model_names[0]
        if name not in self.model_names:
            raise NotFoundError(f"The model `{name}` does not exist.", param="model")
        return name

    def check_common(self, req: SamplingFields) -> None:
        if req.stream_options is not None and not req.stream:
            raise BadRequestError(
                "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        n = 1 if req.n is None else req.n
        if not 1 <= n <= self.settings.max_n:
            raise BadRequestError(f"n must be in [1, {self.settings.max_n}], got {n}", "n")

    def include_usage(self, req: SamplingFields) -> bool:
        opts = req.stream_options
        return self.settings.enable_force_include_usage or bool(opts and opts.include_usage)

    def max_tokens(self, requested: int | None, default: int | None, prompt_len: int) -> int:
        """Requested budget, checked against the context; unrequested: default, clamped."""
        limit = self.engine.max_model_len
        room = limit - prompt_len
        if room <= 0:
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {prompt_len} tokens, which leaves no room for output. Please reduce the "
                "length of the prompt.",
                param="input_tokens",
            )
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested} output tokens and your prompt has {prompt_len} input tokens, for a "
                f"total of {requested + prompt_len} tokens. Please reduce the length of the "
                "prompt or the number of requested output tokens.",
                param="max_tokens",
            )
        return requested

    def sampling_params(self, req: SamplingFields, max_tokens: int, **kw: Any) -> SamplingParams:
        return SamplingParams(
            n=1 if req.n is None else req.n,
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            **kw,
        )

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs for one request. Leaving early for any reason (client gone,
        cancellation, error) aborts the request so its KV blocks are freed."""
        finished, start, last = False, time.monotonic(), None
        out: RequestOutput | None = None
        self.metrics.on_start()
        gen = self.engine.generate(request_id, prompt_ids, params)
        try:
            async for out in gen:
                if out.error:
                    raise EngineError(out.error)
                last = self._observe(start, last, out)
                finished = out.finished
                yield out
                if finished:
                    break
        finally:
            # Shielded (the caller may be cancelled) but bounded (the engine may be dead).
            with anyio.move_on_after(ABORT_TIMEOUT_S, shield=True):
                if not finished:
                    await self._abort(request_id)
                with contextlib.suppress(Exception):
                    await gen.aclose()  # type: ignore[attr-defined]
            self._finish(start, prompt_ids, out)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # a failed abort must not hide why the request ended
            logger.exception("engine.abort(%s) failed", request_id)

    def _observe(self, start: float, last: float | None, out: RequestOutput) -> float | None:
        if not any(c.token_ids for c in out.outputs):
            return last
        now = time.monotonic()
        if last is None:
            self.metrics.on_first_token(now - start)
        else:
            self.metrics.on_next_output(now - last)
        return now

    def _finish(self, start: float, prompt_ids: list[int], out: RequestOutput | None) -> None:
        outputs = out.outputs if out is not None else []
        reasons = [c.finish_reason or "abort" for c in outputs] or ["abort"]
        num_out = sum(len(c.token_ids) for c in outputs)
        self.metrics.on_end(len(prompt_ids), num_out, reasons, time.monotonic() - start)


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators, tagging items with their stream's position.
    Leaving early cancels every stream (each then aborts its engine request)."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None, False))
        except Exception as e:  # surfaced to the consumer below
            await queue.put((i, None, e, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc, done = await queue.get()
            if exc is not None:
                raise exc
            if done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` unless the client goes away first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    return task.result() if not task.cancelled() else None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def raise_api(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map ValueError & co. raised by a route to APIError, whose handler answers without
    Starlette's server-error path (which would log a traceback for every bad request)."""

    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except APIError:
            raise
        except Exception as e:
            raise to_api_error(e) from e

    return wrapped
