"""Messages to the API server: per-step token updates from the coordinator, engine stats."""

from __future__ import annotations

from dataclasses import dataclass, field

from afd.engine.messages import PromptLogprobs, TokenLogprobs
from transport.codec import message


@message
@dataclass
class SeqUpdate:
    """New tokens of one choice since the last update; finish_reason set once it ends."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None  # one per new token, if asked
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    prompt_logprobs: list[PromptLogprobs] | None = None  # with the first tokens, if asked


@message
@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: list[float] = field(default_factory=list)  # per attention rank
    num_preemptions: int = 0  # since start
    prefix_queries: int = 0  # since start, in tokens
    prefix_hits: int = 0
    step_phases: dict[str, float] = field(default_factory=dict)  # seconds, this step
    predicted_step_s: float = 0.0


@message
@dataclass
class StepOutputs:
    updates: list[SeqUpdate]
    stats: EngineStats | None = None
    engine_error: str | None = None  # the engine went down (until EngineRestarted, if ever)


@message
@dataclass
class EngineReady:
    """The coordinator loaded the model and started every rank."""

    num_kv_blocks: int
    max_model_len: int
    layout: str  # what runs where, for the start-up banner


@message
@dataclass
class EngineFailed:
    """The coordinator could not start the engine (a bad checkpoint, a rank that died while
    loading): why, in one line, for the server's error message."""

    message: str


@message
@dataclass
class EngineRestarted:
    """After a rank failed (its requests failed with engine_error), the coordinator started new
    ranks (--restart-on-failure): the engine takes requests again."""

    layout: str
