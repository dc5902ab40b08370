"""POST /v1/chat/completions: template -> engine -> reasoning/tool parsing -> JSON or SSE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling_params import SamplingParams
from afd.server.engine_client import EngineClient
from afd.server.errors import BadRequestError
from afd.server.forced_tools import ForcedToolParser
from afd.server.prompts import echo_text
from afd.server.protocol import ChatCompletionRequest, NamedToolChoice
from afd.server.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from afd.server.reasoning_parser import ReasoningStream, create_reasoning_parser, extract_reasoning
from afd.server.request_id import request_id_of
from afd.server.serving_common import DONE, Serving, sse, sse_error, until_disconnect
from afd.server.settings import ServerSettings
from afd.server.sse_response import SSEResponse
from afd.server.tool_parser import ToolParser, ToolStream, create_tool_parser


@dataclass
class ChatContext:
    """Per-request facts that every chunk and choice needs."""

    request: ChatCompletionRequest
    request_id: str
    model: str
    prompt_ids: list[int]
    in_reasoning: bool
    tool_parser: ToolParser | None
    top_logprobs: int | None  # None: no logprobs
    echo: str
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ChoiceState:
    reasoning: ReasoningStream | None
    tools: ToolStream | None
    num_chars: int = 0
    num_tokens: int = 0
    content: str = ""  # content so far, the tool parser's input
    done: bool = False


class ChatServing(Serving):
    def __init__(self, engine: EngineClient, settings: ServerSettings) -> None:
        super().__init__(engine, settings)
        name = self.settings.reasoning_parser
        self.reasoning = create_reasoning_parser(name) if name else None
        # If the tokenizer drops the think markers as special tokens, keep special tokens in
        # the text of reasoning requests, or the parser would never see `</think>`.
        self.reasoning_needs_specials = self.reasoning is not None and not _survives_decode(
            engine.tokenizer, self.reasoning.end_marker
        )
        if self.settings.tool_call_parser:
            create_tool_parser(self.settings.tool_call_parser, [])  # fail fast on a bad name

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        # off the event loop: templating, tokenizing and grammar compiling are CPU work
        request_id = f"chatcmpl-{request_id_of(raw)}"
        ctx, params = await asyncio.to_thread(self._prepare, req, request_id)
        if req.stream:
            return SSEResponse(self._stream(ctx, params))
        final = await until_disconnect(raw, self._last_output(ctx, params))
        if final is None:
            return Response(status_code=499)  # client closed the request; nobody reads this
        return JSONResponse(self._response(ctx, final).model_dump())

    def _prepare(
        self, req: ChatCompletionRequest, request_id: str
    ) -> tuple[ChatContext, SamplingParams]:
        model = self.resolve_model(req.model)
        self.check_common(req)
        top_logprobs = self._check_logprobs(req)
        tool_parser = self._tool_parser(req)
        prompt = self.prompts.render_request(req, self.settings.allow_request_chat_template)
        add_special = bool((req.model_extra or {}).get("add_special_tokens", False))
        prompt_ids = self.prompts.encode(prompt, add_special_tokens=add_special)
        requested = req.max_completion_tokens
        requested = req.max_tokens if requested is None else requested
        max_tokens = self.max_tokens(requested, None, len(prompt_ids))
        # Tool markers may be special tokens; the parser must see them (vLLM does the same).
        skip_special = req.skip_special_tokens and tool_parser is None
        skip_special = skip_special and not self.reasoning_needs_specials
        params = self.sampling_params(
            req,
            max_tokens,
            logprobs=top_logprobs,
            prompt_logprobs=self.prompt_logprobs(req),
            skip_special_tokens=skip_special,
        )
        if isinstance(tool_parser, ForcedToolParser):
            params.structured_outputs = self.structured.forced(params, tool_parser.schema)
        in_reasoning = self.reasoning is not None and self.reasoning.starts_in_reasoning(prompt)
        if in_reasoning and params.structured_outputs is not None:  # constrain the answer only
            marker = self.reasoning.end_marker  # type: ignore[union-attr]
            params.structured_outputs.after = self.prompts.encode(marker, add_special_tokens=False)
        ctx = ChatContext(
            req, request_id, model, prompt_ids, in_reasoning,
            tool_parser, top_logprobs, echo_text(req),
        )  # fmt: skip
        return ctx, params

    def _check_logprobs(self, req: ChatCompletionRequest) -> int | None:
        top = req.top_logprobs
        if top is not None and top > 0 and not req.logprobs:
            raise BadRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        if top is not None and not 0 <= top <= self.settings.max_logprobs:
            limit = self.settings.max_logprobs
            raise BadRequestError(
                f"top_logprobs must be in [0, {limit}], got {top}", "top_logprobs"
            )
        return (top or 0) if req.logprobs else None

    def _tool_parser(self, req: ChatCompletionRequest) -> ToolParser | None:
        choice, tools, name = req.tool_choice, req.tools, self.settings.tool_call_parser
        if choice is not None and choice != "none" and not tools:
            raise BadRequestError("When using `tool_choice`, `tools` must be set.", "tool_choice")
        if tools is not None and not tools:
            raise BadRequestError("`tools` must not be an empty list", param="tools")
        if not tools or choice == "none":
            return None
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if named is not None and named not in {t.function.name for t in tools}:
            message = f"tool_choice names `{named}`, which is not in `tools`"
            raise BadRequestError(message, param="tool_choice")
        if choice == "required" or named is not None:  # enforced by structured outputs
            return ForcedToolParser(tools, choice)
        if (choice or "auto") == "auto" and not self.settings.enable_auto_tool_choice:
            raise BadRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set",
                param="tool_choice",
            )
        return create_tool_parser(name, tools)

    async def _last_output(self, ctx: ChatContext, params: SamplingParams) -> RequestOutput:
        last = None
        async for out in self.generate(ctx.request_id, ctx.prompt_ids, params):
            last = out
        if last is None:
            raise RuntimeError("engine returned no output")
        return last

    # ------------------------------------------------------------------ JSON response

    def _response(self, ctx: ChatContext, out: RequestOutput) -> ChatCompletionResponse:
        choices = [self._choice(ctx, c) for c in sorted(out.outputs, key=lambda c: c.index)]
        tables = out.prompt_logprobs
        return ChatCompletionResponse(
            id=ctx.request_id, created=ctx.created, model=ctx.model, choices=choices,
            usage=self._usage(ctx, out),
            prompt_logprobs=None if tables is None else self.logprobs.prompt(tables),
        )  # fmt: skip

    def _choice(self, ctx: ChatContext, c: CompletionOutput) -> ChatChoice:
        reasoning, content = None, c.text
        if self.reasoning is not None:
            reasoning, content = extract_reasoning(self.reasoning, c.text, ctx.in_reasoning)
        calls = []
        if ctx.tool_parser is not None and content:
            content, calls = ctx.tool_parser.extract(content)
        if ctx.echo:
            content = ctx.echo + (content or "")
        if not ctx.request.include_reasoning:
            reasoning = None
        message = AssistantMessage(content=content, tool_calls=calls, reasoning=reasoning)
        if self.settings.emit_reasoning_content:
            message.reasoning_content = reasoning
        # a forced named function keeps "stop", as OpenAI (and vLLM) answer it; streamed
        # chunks say "tool_calls" once tool deltas went out, as vLLM's do
        named = isinstance(ctx.tool_parser, ForcedToolParser) and ctx.tool_parser.named
        called = calls and not named
        finish = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
        return ChatChoice(
            index=c.index, message=message, finish_reason=finish, stop_reason=c.stop_reason,
            logprobs=self._logprobs(ctx, c.token_ids, c.logprobs),
        )  # fmt: skip

    @staticmethod
    def _usage(ctx: ChatContext, out: RequestOutput) -> UsageInfo:
        num_out = sum(len(c.token_ids) for c in out.outputs)
        num_in = len(ctx.prompt_ids)
        return UsageInfo.of(num_in, num_out)

    def _logprobs(
        self, ctx: ChatContext, ids: list[int], lps: list[dict[int, Logprob]] | None
    ) -> ChatLogprobs | None:
        if ctx.top_logprobs is None or lps is None:
            return None
        return self.logprobs.chat(ids, lps, ctx.top_logprobs)

    # ------------------------------------------------------------------ SSE stream

    async def _stream(self, ctx: ChatContext, params: SamplingParams) -> AsyncIterator[str]:
        states = [self._new_state(ctx) for _ in range(params.n)]
        last: RequestOutput | None = None
        try:
            async for out in self.generate(ctx.request_id, ctx.prompt_ids, params):
                if last is None and not (out.finished or any(c.token_ids for c in out.outputs)):
                    continue  # prefill progress: the role chunk waits for a token (true TTFT)
                if last is None:
                    for i in range(params.n):
                        yield sse(self._chunk(ctx, i, DeltaMessage(role="assistant", content="")))
                        if ctx.echo:
                            yield sse(self._chunk(ctx, i, DeltaMessage(content=ctx.echo)))
                last = out
                for c in out.outputs:
                    chunk = self._delta_chunk(ctx, states[c.index], c)
                    if chunk is not None:
                        yield sse(chunk)
            if last is not None and self.include_usage(ctx.request):
                yield sse(self._usage_chunk(ctx, last))
        except Exception as e:  # the 200 is already sent: report in-band, as vLLM does
            yield sse_error(e)
        yield DONE

    def _new_state(self, ctx: ChatContext) -> ChoiceState:
        reasoning = ReasoningStream(self.reasoning, ctx.in_reasoning) if self.reasoning else None
        tools = ToolStream(ctx.tool_parser) if ctx.tool_parser else None
        return ChoiceState(reasoning, tools)

    def _chunk(self, ctx: ChatContext, index: int, delta: DeltaMessage) -> ChatCompletionChunk:
        choice = ChatStreamChoice(index=index, delta=delta, logprobs=None, finish_reason=None)
        return ChatCompletionChunk(
            id=ctx.request_id, created=ctx.created, model=ctx.model, choices=[choice]
        )

    def _usage_chunk(self, ctx: ChatContext, out: RequestOutput) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=ctx.request_id, created=ctx.created, model=ctx.model, choices=[],
            usage=self._usage(ctx, out),
        )  # fmt: skip

    def _delta_chunk(
        self, ctx: ChatContext, st: ChoiceState, c: CompletionOutput
    ) -> ChatCompletionChunk | None:
        if st.done:
            return None
        final = c.finish_reason is not None
        lps = self._logprobs(ctx, c.token_ids[st.num_tokens :], (c.logprobs or [])[st.num_tokens :])
        st.num_tokens = len(c.token_ids)
        delta = self._delta(ctx, st, c.text, final)
        if not final and not delta.model_fields_set and not (lps and lps.content):
            return None  # a parser is holding text back: vLLM sends no chunk at all
        chunk = self._chunk(ctx, c.index, delta)
        chunk.choices[0].logprobs = lps
        if final:
            st.done = True
            called = st.tools is not None and st.tools.called
            reason = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
            chunk.choices[0].finish_reason = reason
            chunk.choices[0].stop_reason = c.stop_reason
        return chunk

    def _delta(self, ctx: ChatContext, st: ChoiceState, text: str, final: bool) -> DeltaMessage:
        if st.reasoning is not None:
            reasoning, content = st.reasoning.update(text, final)
        else:
            reasoning, content = "", text[st.num_chars :]
            st.num_chars = len(text)
        delta = DeltaMessage()
        if st.tools is not None:
            st.content += content
            content, calls = st.tools.update(st.content, final)
            if calls:
                delta.tool_calls = calls
        if reasoning and ctx.request.include_reasoning:
            delta.reasoning = reasoning
            if self.settings.emit_reasoning_content:
                delta.reasoning_content = reasoning
        if content:
            delta.content = content
        return delta


def _survives_decode(tokenizer: object, marker: str) -> bool:
    ids = tokenizer.encode(marker, add_special_tokens=False)  # type: ignore[attr-defined]
    return marker in tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
