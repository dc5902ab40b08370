"""What chat and completions serving share: model lookup, sampling parameters, the context
length check, cancellation on disconnect, and SSE framing."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel

from afd.sampling_params import SamplingParams
from afd.server.engine_client import EngineClient
from afd.server.engine_stream import EngineStreams
from afd.server.errors import APIError, BadRequestError, NotFoundError, error_body, to_api_error
from afd.server.logprobs import LogprobFormatter
from afd.server.metrics import ServerMetrics
from afd.server.prompts import PromptBuilder
from afd.server.protocol import SamplingFields
from afd.server.settings import ServerSettings
from afd.server.structured import StructuredRequests

T = TypeVar("T")
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
        self.prompts = PromptBuilder(
            engine.tokenizer,
            settings.chat_template,
            lambda: engine.max_model_len,
            getattr(engine, "vocab_size", None),
        )
        slo = settings.tpot_slo_ms / 1000 if settings.tpot_slo_ms else None
        self.metrics = ServerMetrics(self.model_names[0], slo)
        self.streams = EngineStreams(engine, self.metrics)
        self.generate = self.streams.stream
        self.logprobs = LogprobFormatter(engine.tokenizer)
        self.structured = StructuredRequests(engine.tokenizer, engine.vocab_size)

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

    def prompt_logprobs(self, req: SamplingFields) -> int | None:
        """vLLM's `prompt_logprobs` extra, checked as vLLM does: within --max-logprobs, and not
        on a stream, whose chunks have no place for it."""
        n = req.prompt_logprobs
        if n is None:
            return None
        limit = self.settings.max_logprobs
        if not 0 <= n <= limit:
            raise BadRequestError(
                f"prompt_logprobs must be in [0, {limit}], got {n}", "prompt_logprobs"
            )
        if req.stream:
            raise BadRequestError(
                "prompt_logprobs are not available when stream=true", "prompt_logprobs"
            )
        return n

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

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's {"token id": bias} with ids checked against the vocabulary."""
        out = {}
        for key, value in (bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise BadRequestError(
                    f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
                ) from None
            vocab = self.prompts.vocab_size
            if token < 0 or (vocab is not None and token >= vocab):
                raise BadRequestError(
                    f"logit_bias token id {token} is out of range [0, {vocab})", "logit_bias"
                )
            out[token] = value
        return out

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
            min_p=req.min_p or 0.0,
            logit_bias=self._logit_bias(req.logit_bias),
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=self.structured.parse(req),
            **kw,
        )


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
