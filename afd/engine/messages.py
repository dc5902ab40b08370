"""Messages to the coordinator: what an attention rank returns for a step, and liveness."""

from __future__ import annotations

from dataclasses import dataclass, field

from afd.sampling_params import SamplingParams
from transport.codec import message


@message
@dataclass
class TokenLogprobs:
    """A sampled token's logprob and rank in the raw distribution, and the top alternatives
    that SamplingParams.logprobs asked for, most likely first."""

    logprob: float
    rank: int  # 1: it was the most likely token
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@message
@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprobs: TokenLogprobs | None = None  # only for sequences that asked for logprobs


@message
@dataclass
class PromptLogprobs:
    """Prompt tokens start .. start + len - 1 of one sequence, each scored given the tokens
    before it (columnar: one prefill chunk's worth in one message)."""

    seq_id: int
    start: int  # position of the first scored token (>= 1: the first prompt token has none)
    logprobs: list[float] = field(default_factory=list)  # of each prompt token
    ranks: list[int] = field(default_factory=list)  # 1: it was the most likely token
    top_ids: list[list[int]] = field(default_factory=list)  # per token, most likely first
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logprobs)


@message
@dataclass
class StepTimings:
    """Seconds spent by one attention rank in each phase of a step. On a GPU the stage times
    are device time from CUDA events (StageClock); sampling and total are host time."""

    attention: float = 0.0  # attention blocks
    ffn: float = 0.0  # FFN compute (colocated: here; disaggregated: the slowest FFN rank)
    # how long attention stalled for FFN partials (its stream on a GPU with nccl, else the
    # host): FFN compute and transfers that the micro-batch pipeline did not hide
    ffn_wait: float = 0.0
    sampling: float = 0.0
    total: float = 0.0


@message
@dataclass
class FFNStepDone:
    """An FFN rank finished a step: its compute time, for the step's phase metrics."""

    rank_name: str
    step: int
    compute_s: float


@message
@dataclass
class StepResult:
    step: int
    rank: int
    sampled: list[SampledToken] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


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


@message
@dataclass
class AddRequest:
    """From the API server: a tokenized request (its n choices become sequences here)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0


@message
@dataclass
class AbortRequest:
    request_id: str
    indices: list[int] | None = None  # choices to stop (a stop string hit); None: all
