"""What generation returns: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's entry in the table of a prompt or generated position, as vLLM's `Logprob`."""

    logprob: float
    rank: int | None = None  # 1: the most likely token at that position
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # with SamplingParams.logprobs, one table per generated token: its own entry first, then
    # the top alternatives (vLLM's shape, as prompt_logprobs)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    # with SamplingParams.prompt_logprobs, once the prompt is computed: one table per prompt
    # token (its own entry first, then the top alternatives); None for the first token
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
