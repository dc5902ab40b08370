"""Engine outputs for one request, as the serving code consumes them: aborted on any early
exit, timed for metrics, and failed (not hung) when the engine dies mid-request."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import anyio

from afd.detokenizer import safe_emit_length
from afd.outputs import RequestOutput
from afd.sampling_params import SamplingParams
from afd.server.engine_client import EngineClient, EngineError
from afd.server.metrics import ServerMetrics

T = TypeVar("T")
logger = logging.getLogger(__name__)
ABORT_TIMEOUT_S = 5.0
_END = object()  # the engine's iterator ran out
# Suffixes that keep engine request ids unique although clients pick X-Request-Id freely; one
# counter for the process, as chat and completions share the engine.
_serials = itertools.count()


class EngineStreams:
    health_poll_s = 1.0  # how soon requests waiting on a dead engine are failed

    def __init__(self, engine: EngineClient, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.waiting: set[asyncio.Queue[Any]] = set()
        self.watchdog: asyncio.Task[None] | None = None
        self.eos_text: str | None = getattr(engine.tokenizer, "eos_token", None)

    async def stream(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one engine request, which runs as `<request_id>-<serial>`: two clients
        sending one X-Request-Id still get one engine request each. Leaving early for any
        reason (client gone, cancellation, error) aborts it so its KV blocks are freed."""
        engine_id = f"{request_id}-{next(_serials)}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pump = asyncio.create_task(
            _pump(self.engine.generate(engine_id, prompt_ids, params), queue)
        )
        self._watch(queue)
        self.metrics.on_start()
        finished, start, last, out = False, time.monotonic(), None, None
        first = None  # when the first token arrived, for TPOT
        try:
            while not finished:
                out = self._visible(_check(await queue.get()), params)
                last = self._observe(start, last, out)
                first = first or last
                finished = out.finished
                yield out
        finally:
            self.waiting.discard(queue)
            # Shielded (the caller may be cancelled) but bounded (the engine may be dead).
            with anyio.move_on_after(ABORT_TIMEOUT_S, shield=True):
                if not finished:
                    await self._abort(engine_id)
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            self._finish(start, first, prompt_ids, out)

    def _visible(self, out: RequestOutput, params: SamplingParams) -> RequestOutput:
        """Defend the stream contract: text that may still become a stop string is held back
        until the choice ends, and a detokenized EOS is not part of the answer."""
        for i, c in enumerate(out.outputs):
            text = c.text
            if c.finish_reason is None and params.stop:
                text = text[: safe_emit_length(text, params.stop)]
            elif c.finish_reason == "stop" and c.stop_reason is None and self.eos_text:
                text = text.removesuffix(self.eos_text)
            if text is not c.text:
                out.outputs[i] = dataclasses.replace(c, text=text)
        return out

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # a failed abort must not hide why the request ended
            logger.exception("engine.abort(%s) failed", request_id)

    def _watch(self, queue: asyncio.Queue[Any]) -> None:
        self.waiting.add(queue)
        if self.watchdog is None or self.watchdog.done():
            self.watchdog = asyncio.create_task(self._poll_health())

    async def _poll_health(self) -> None:
        # One poller for all requests; it stops when none is waiting.
        while self.waiting:
            await asyncio.sleep(self.health_poll_s)
            if not self.engine.is_healthy():
                why = getattr(self.engine, "error", None) or "the engine is not healthy"
                for queue in list(self.waiting):
                    queue.put_nowait(EngineError(f"{why}; request dropped"))

    def _observe(self, start: float, last: float | None, out: RequestOutput) -> float | None:
        if not any(c.token_ids for c in out.outputs):
            return last
        now = time.monotonic()
        if last is None:
            self.metrics.on_first_token(now - start)
        else:
            self.metrics.on_next_output(now - last)
        return now

    def _finish(
        self, start: float, first: float | None, prompt_ids: list[int], out: RequestOutput | None
    ) -> None:
        outputs = out.outputs if out is not None else []
        reasons = [c.finish_reason or "abort" for c in outputs] or ["abort"]
        num_out = sum(len(c.token_ids) for c in outputs)
        now = time.monotonic()
        self.metrics.on_end(len(prompt_ids), num_out, reasons, now - start)
        longest = max((len(c.token_ids) for c in outputs), default=0)
        if first is not None and longest > 1:
            self.metrics.on_tpot((now - first) / (longest - 1))


async def _pump(outputs: AsyncIterator[RequestOutput], queue: asyncio.Queue[Any]) -> None:
    try:
        async for out in outputs:
            queue.put_nowait(out)
        queue.put_nowait(_END)
    except Exception as e:  # handed to the consumer, which raises it
        queue.put_nowait(e)


def _check(item: Any) -> RequestOutput:
    if isinstance(item, BaseException):
        raise item
    if item is _END:
        raise EngineError("the engine ended the request without a finished output")
    if item.error:
        raise EngineError(item.error)
    return item


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
