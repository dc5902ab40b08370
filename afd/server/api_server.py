"""The OpenAI-compatible HTTP server: `build_app(engine, settings)` and its CLI flags."""

from __future__ import annotations

import argparse
import importlib.metadata
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from afd.arg_types import non_empty, non_negative_int, port
from afd.server.engine_client import EngineClient
from afd.server.errors import AuthenticationError, BadRequestError, error_response
from afd.server.errors import install_error_handlers as _install_error_handlers
from afd.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from afd.server.protocol_responses import (
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    TokenizeResponse,
)
from afd.server.reasoning_parser import REASONING_PARSERS
from afd.server.request_id import RequestIdMiddleware
from afd.server.serving_chat import ChatServing
from afd.server.serving_common import raise_api
from afd.server.serving_completion import CompletionServing
from afd.server.settings import ServerSettings
from afd.server.tool_parser import TOOL_PARSERS

__all__ = ["ServerSettings", "add_server_args", "build_app", "settings_from_args"]


def _version() -> str:
    try:
        return importlib.metadata.version("afd")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+local"


class APIKeyMiddleware:
    """Bearer-token check on /v1/* only: health, metrics and version stay open to probes."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope.get("method") != "OPTIONS"
        if guarded and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = error_response(AuthenticationError("Unauthorized: invalid API key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="afd", version=_version())
    _install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so a 401 carries it too
    chat = ChatServing(engine, settings)
    completion = CompletionServing(engine, settings)

    @app.post("/v1/chat/completions")
    @raise_api
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(body, raw)

    @app.post("/v1/completions")
    @raise_api
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await completion.create(body, raw)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(_model_list(engine, chat.model_names, settings).model_dump())

    _add_probes(app, engine)
    _add_token_routes(app, chat)
    return app


def _model_list(engine: EngineClient, names: tuple[str, ...], s: ServerSettings) -> ModelList:
    cards = [
        ModelCard(
            id=name,
            owned_by=s.owned_by,
            root=engine.model_root,
            max_model_len=engine.max_model_len,
            permission=[ModelPermission(id=f"modelperm-{secrets.token_hex(16)}")],
        )  # fmt: skip
        for name in names
    ]
    return ModelList(data=cards)


def _add_probes(app: FastAPI, engine: EngineClient) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_healthy() else 503)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200 if engine.is_healthy() else 503)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _add_token_routes(app: FastAPI, serving: ChatServing) -> None:
    @app.post("/tokenize")
    @raise_api
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        serving.resolve_model(body.model)
        prompts = serving.prompts
        if body.messages is not None:
            kwargs = dict(body.chat_template_kwargs or {})
            text = prompts.render_chat(
                body.messages, body.tools, body.add_generation_prompt, kwargs
            )
            add_special = bool(body.add_special_tokens)
        elif body.prompt is not None:
            text = body.prompt
            add_special = body.add_special_tokens is not False
        else:
            raise BadRequestError("tokenize needs `prompt` or `messages`", param="prompt")
        ids = prompts.tokenizer.encode(text, add_special_tokens=add_special)
        strs = [serving.logprobs.token_str(i) for i in ids] if body.return_token_strs else None
        limit = serving.engine.max_model_len
        result = TokenizeResponse(count=len(ids), max_model_len=limit, tokens=ids, token_strs=strs)
        return JSONResponse(result.model_dump())

    @app.post("/detokenize")
    @raise_api
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        serving.resolve_model(body.model)
        ids = serving.prompts.check_ids(body.tokens, "tokens") if body.tokens else []
        text = serving.engine.tokenizer.decode(ids, skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP layer's flags (vLLM's names), for the `afd-serve` launcher."""
    g = parser.add_argument_group("OpenAI server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=port, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use")
    g.add_argument(
        "--api-key", type=non_empty, default=None, help="require `Authorization: Bearer KEY` on /v1"
    )
    g.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None)
    g.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None)
    g.add_argument("--enable-auto-tool-choice", action="store_true")
    g.add_argument("--chat-template", default=None, help="Jinja file or source; overrides model")
    g.add_argument("--max-logprobs", type=non_negative_int, default=20)
    g.add_argument("--enable-force-include-usage", action="store_true")
    g.add_argument("--no-reasoning-content", action="store_true", help="emit only `reasoning`")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        chat_template=args.chat_template,
        max_logprobs=args.max_logprobs,
        enable_force_include_usage=args.enable_force_include_usage,
        emit_reasoning_content=not args.no_reasoning_content,
    )
