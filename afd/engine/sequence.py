"""A sequence: one choice of one request, as the coordinator tracks it. No phase flag: prefill is
`num_computed_tokens` catching up with `num_tokens` (chunked prefill falls out of that)."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from afd.engine.messages import PromptLogprobs, TokenLogprobs
from afd.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within its request
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # with params.logprobs
    # chunks as the rank computed them, covering prompt positions 1, 2, ... in order
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    rank: int | None = None
    block_ids: list[int] = field(default_factory=list)
    num_registered: int = 0  # full blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    block_hashes: list[int] = field(default_factory=list)  # hash chain of its full blocks
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_remaining_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def has_prompt_logprobs(self) -> bool:
        """Every prompt position after the first is scored."""
        return sum(len(c) for c in self.prompt_logprobs) >= len(self.prompt_token_ids) - 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prefill must score the prompt: asked for, not yet complete, and computed by the
        first choice only (all choices share one prompt)."""
        asked = self.params.prompt_logprobs is not None and self.index == 0
        return asked and not self.has_prompt_logprobs


def request_sequences(
    request_id: str, prompt_token_ids: list[int], params: SamplingParams, ids: Iterator[int]
) -> list[Sequence]:
    """One sequence per choice; choice i samples with seed + i, so choices differ and repeat."""
    return [
        Sequence(
            next(ids),
            request_id,
            i,
            list(prompt_token_ids),
            params,
            seed=None if params.seed is None else params.seed + i,
        )
        for i in range(params.n)
    ]
