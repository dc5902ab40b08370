"""ServerSettings: everything the HTTP layer is configured with (built once from CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...] = ()  # aliases; empty: the engine's model_name
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    reasoning_parser: str | None = None  # e.g. "step3"
    tool_call_parser: str | None = None  # e.g. "step3"
    enable_auto_tool_choice: bool = False
    chat_template: str | None = None  # file path or Jinja source; overrides the checkpoint's
    max_logprobs: int = 20
    max_n: int = 128  # cap on choices per request, so one request cannot flood the engine
    emit_reasoning_content: bool = True  # also emit the legacy `reasoning_content` key
    enable_force_include_usage: bool = False  # usage chunk on every stream
    allow_request_chat_template: bool = False  # honour a per-request `chat_template`
    owned_by: str = "afd"
    tpot_slo_ms: float | None = None  # judged per finished request in afd:tpot_slo_* metrics

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}")
