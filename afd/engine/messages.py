"""Messages to the coordinator: what an attention rank returns for a step, and liveness."""

from __future__ import annotations

from dataclasses import dataclass, field

from transport.codec import message


@message
@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@message
@dataclass
class StepTimings:
    """Seconds spent by one attention rank in each phase of a step."""

    attention: float = 0.0
    ffn_wait: float = 0.0
    sampling: float = 0.0
    total: float = 0.0


@message
@dataclass
class StepResult:
    step: int
    rank: int
    sampled: list[SampledToken] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)


@message
@dataclass
class WorkerError:
    """A rank hit an error it cannot recover from; the coordinator fails in-flight requests."""

    rank_name: str
    message: str


@message
@dataclass
class Heartbeat:
    rank_name: str
    time: float


@message
@dataclass
class WorkerReady:
    """A rank loaded its weights; tells the coordinator where its transport listens."""

    rank_name: str
    transport_address: str
    num_kv_blocks: int = 0  # attention ranks: blocks its memory holds
