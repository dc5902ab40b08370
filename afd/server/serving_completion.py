"""POST /v1/completions: one engine request per prompt, choices merged, JSON or SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling_params import SamplingParams
from afd.server.engine_stream import merge_streams
from afd.server.errors import BadRequestError
from afd.server.protocol import CompletionRequest
from afd.server.protocol_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
)
from afd.server.request_id import request_id_of
from afd.server.serving_common import DONE, Serving, sse, sse_error, until_disconnect
from afd.server.sse_response import SSEResponse

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class CompletionContext:
    request: CompletionRequest
    request_id: str
    model: str
    prompts: list[list[int]]
    echo_texts: list[str]  # per prompt; empty strings without echo
    logprobs: int | None
    n: int
    echo_only: bool = False  # echo with max_tokens=0: the prompt is the whole answer
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ChoiceCursor:
    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False  # the echo (if any) went out with the first chunk
    done: bool = False


class CompletionServing(Serving):
    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        # off the event loop: templating, tokenizing and grammar compiling are CPU work
        ctx, params = await asyncio.to_thread(self._prepare, req, f"cmpl-{request_id_of(raw)}")
        if req.stream:
            return SSEResponse(self._stream(ctx, params))
        outs = await until_disconnect(raw, self._collect(ctx, params))
        if outs is None:
            return Response(status_code=499)  # client closed the request; nobody reads this
        return JSONResponse(self._response(ctx, outs).model_dump())

    def _prepare(
        self, req: CompletionRequest, request_id: str
    ) -> tuple[CompletionContext, list[SamplingParams | None]]:
        model = self.resolve_model(req.model)
        self.check_common(req)
        n = 1 if req.n is None else req.n
        self._check_unsupported(req, n)
        prompt_logprobs = self.prompt_logprobs(req)
        if prompt_logprobs is None and req.echo and req.logprobs is not None:
            prompt_logprobs = req.logprobs  # the echoed tokens' logprobs, as vLLM
        prompts = self.prompts.completion_prompts(req.prompt, req.add_special_tokens)
        params = [self._params(req, len(p), prompt_logprobs) for p in prompts]
        echo = [self._echo_text(req, i, p) for i, p in enumerate(prompts)]
        echo_only = req.echo and req.max_tokens == 0
        ctx = CompletionContext(req, request_id, model, prompts, echo, req.logprobs, n, echo_only)
        return ctx, params

    def _check_unsupported(self, req: CompletionRequest, n: int) -> None:
        if req.suffix is not None:
            raise BadRequestError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of not in (1, n):
            raise BadRequestError("best_of is not supported (use n)", param="best_of")
        limit = self.settings.max_logprobs
        if req.logprobs is not None and not 0 <= req.logprobs <= limit:
            raise BadRequestError(
                f"logprobs must be in [0, {limit}], got {req.logprobs}", "logprobs"
            )

    def _params(
        self, req: CompletionRequest, prompt_len: int, prompt_logprobs: int | None
    ) -> SamplingParams | None:
        if req.echo and req.max_tokens == 0:
            self.max_tokens(None, 1, prompt_len)  # still reject prompts that do not fit
            if prompt_logprobs is None:
                return None  # echo only: nothing to generate
            # the prompt's logprobs come with the first token: compute one, show none; one
            # sample scores the prompt for all n choices, which are the prompt alone
            params = self.sampling_params(req, 1, prompt_logprobs=prompt_logprobs)
            return dataclasses.replace(params, n=1)
        max_tokens = self.max_tokens(req.max_tokens, DEFAULT_MAX_TOKENS, prompt_len)
        return self.sampling_params(
            req,
            max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )

    def _echo_text(self, req: CompletionRequest, i: int, ids: list[int]) -> str:
        if not req.echo:
            return ""
        if isinstance(req.prompt, str):
            return req.prompt
        if isinstance(req.prompt, list) and isinstance(req.prompt[i], str):
            return req.prompt[i]
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def _streams(
        self, ctx: CompletionContext, params: list[SamplingParams | None]
    ) -> list[AsyncIterator[RequestOutput]]:
        many = len(ctx.prompts) > 1
        streams = []
        for i, (ids, p) in enumerate(zip(ctx.prompts, params, strict=True)):
            if p is None:
                streams.append(_echo_only(ctx.n, ids))
                continue
            stream = self.generate(f"{ctx.request_id}-{i}" if many else ctx.request_id, ids, p)
            streams.append(_without_generated(stream, ctx.n) if ctx.echo_only else stream)
        return streams

    async def _collect(
        self, ctx: CompletionContext, params: list[SamplingParams | None]
    ) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for i, out in merge_streams(self._streams(ctx, params)):
            last[i] = out
        return [last[i] for i in range(len(ctx.prompts))]

    # ------------------------------------------------------------------ JSON response

    def _response(self, ctx: CompletionContext, outs: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, out in enumerate(outs):
            tables = out.prompt_logprobs
            shown = None if tables is None else self.logprobs.prompt(tables)
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids, lps = self._with_echo(ctx, i, tables, c.token_ids, c.logprobs)
                choices.append(
                    CompletionChoice(
                        index=i * ctx.n + c.index,
                        text=ctx.echo_texts[i] + c.text,
                        logprobs=self._logprobs(ctx, ids, lps, 0)[0],
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                        prompt_logprobs=shown,
                    )  # fmt: skip
                )
        return CompletionResponse(
            id=ctx.request_id, created=ctx.created, model=ctx.model, choices=choices,
            usage=self._usage(ctx, outs),
        )  # fmt: skip

    @staticmethod
    def _usage(ctx: CompletionContext, outs: list[RequestOutput]) -> UsageInfo:
        num_in = sum(len(p) for p in ctx.prompts)
        num_out = sum(len(c.token_ids) for out in outs for c in out.outputs)
        return UsageInfo.of(num_in, num_out)

    def _logprobs(
        self,
        ctx: CompletionContext,
        ids: list[int],
        lps: list[dict[int, Logprob] | None] | None,
        at: int,
    ) -> tuple[CompletionLogprobs | None, int]:
        if ctx.logprobs is None or lps is None:
            return None, at
        return self.logprobs.completion(ids, lps, ctx.logprobs, at)

    @staticmethod
    def _with_echo(
        ctx: CompletionContext,
        i: int,
        tables: list[dict[int, Logprob] | None] | None,
        ids: list[int],
        lps: list[dict[int, Logprob]] | None,
    ) -> tuple[list[int], list[dict[int, Logprob] | None] | None]:
        """With echo and logprobs, the prompt's tokens and logprobs go in front."""
        if not ctx.request.echo or ctx.logprobs is None or tables is None:
            return ids, lps
        return ctx.prompts[i] + ids, tables + (lps or [])

    # ------------------------------------------------------------------ SSE stream

    async def _stream(
        self, ctx: CompletionContext, params: list[SamplingParams | None]
    ) -> AsyncIterator[str]:
        cursors: dict[tuple[int, int], ChoiceCursor] = {}
        last: dict[int, RequestOutput] = {}
        try:
            async for i, out in merge_streams(self._streams(ctx, params)):
                last[i] = out
                for c in out.outputs:
                    cursor = cursors.setdefault((i, c.index), ChoiceCursor())
                    chunk = self._delta_chunk(ctx, i, cursor, c, out)
                    if chunk is not None:
                        yield sse(chunk)
            if self.include_usage(ctx.request) and len(last) == len(ctx.prompts):
                outs = [last[i] for i in range(len(ctx.prompts))]
                usage = self._usage(ctx, outs)
                yield sse(self._chunk(ctx, [], usage=usage))
        except Exception as e:  # the 200 is already sent: report in-band, as vLLM does
            yield sse_error(e)
        yield DONE

    def _chunk(
        self,
        ctx: CompletionContext,
        choices: list[CompletionChoice],
        usage: UsageInfo | None = None,
    ) -> CompletionResponse:
        chunk = CompletionResponse(
            id=ctx.request_id, created=ctx.created, model=ctx.model, choices=choices
        )
        if usage is not None:
            chunk.usage = usage
        return chunk

    def _delta_chunk(
        self,
        ctx: CompletionContext,
        i: int,
        cur: ChoiceCursor,
        c: CompletionOutput,
        out: RequestOutput,
    ) -> CompletionResponse | None:
        if cur.done:
            return None
        final, tables = c.finish_reason is not None, out.prompt_logprobs
        echo_logprobs = ctx.request.echo and ctx.logprobs is not None
        if not cur.started and echo_logprobs and tables is None and not out.finished:
            # The echo waits for the prompt's logprobs. They come with the first choice's
            # first token: another choice (from the prefix cache) may finish before that.
            return None
        echo = "" if cur.started else ctx.echo_texts[i]
        text = echo + c.text[cur.num_chars :]
        if not text and not final and len(c.token_ids) == cur.num_tokens:
            return None
        ids, lps = c.token_ids[cur.num_tokens :], (c.logprobs or [])[cur.num_tokens :]
        if not cur.started:
            ids, lps = self._with_echo(ctx, i, tables, ids, lps)
        cur.started = True
        lps, cur.text_offset = self._logprobs(ctx, ids, lps, cur.text_offset)
        cur.num_chars, cur.num_tokens = len(c.text), len(c.token_ids)
        choice = CompletionChoice(
            index=i * ctx.n + c.index, text=text, logprobs=lps, finish_reason=None
        )
        if final:
            cur.done = True
            choice.finish_reason = c.finish_reason
            choice.stop_reason = c.stop_reason
        return self._chunk(ctx, [choice])


async def _without_generated(
    outputs: AsyncIterator[RequestOutput], n: int
) -> AsyncIterator[RequestOutput]:
    """`echo` with `max_tokens=0` and prompt logprobs: the engine samples one token (one
    choice) to score the prompt; the answer is the prompt alone, n times, as `_echo_only`."""
    async with aclosing(outputs) as stream:  # closing this closes (aborts) the engine request
        async for out in stream:
            done = all(c.finish_reason is not None for c in out.outputs)
            reason = "length" if done else None
            shown = [CompletionOutput(j, finish_reason=reason) for j in range(n)]
            yield dataclasses.replace(out, outputs=shown)


async def _echo_only(n: int, prompt_ids: list[int]) -> AsyncIterator[RequestOutput]:
    """`echo` with `max_tokens=0`: the prompt is the whole answer; the engine is not asked."""
    outputs = [CompletionOutput(index=j, finish_reason="length") for j in range(n)]
    yield RequestOutput("echo", None, prompt_ids, outputs, finished=True)
