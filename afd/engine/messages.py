"""Messages to the coordinator: what an attention rank returns for a step, and liveness."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class StepTimings:
    """Seconds spent by one attention rank in each phase of a step."""

    attention: float = 0.0
    ffn_wait: float = 0.0
    sampling: float = 0.0
    total: float = 0.0


@dataclass
class StepResult:
    step: int
    rank: int
    sampled: list[SampledToken] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)


@dataclass
class WorkerError:
    """A rank hit an error it cannot recover from; the coordinator fails in-flight requests."""

    rank_name: str
    message: str


@dataclass
class Heartbeat:
    rank_name: str
    time: float
