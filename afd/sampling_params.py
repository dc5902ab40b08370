"""SamplingParams: how one request is sampled and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import json as jsonlib
import math
from dataclasses import dataclass, field

from transport.codec import message


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the parameter."""


# vLLM's floor for a positive temperature: below it, logits / temperature overflow float32
# (1e-45 is 0 there) and a row's probabilities turn to NaN
MIN_TEMPERATURE = 1e-2


@message
@dataclass
class StructuredOutputs:
    """Constrains the output (vLLM's StructuredOutputsParams): exactly one of a JSON schema
    (`json`, a dict or its JSON text), any JSON object (`json_object`), a regular expression,
    a choice of strings, or a Lark / GBNF grammar. The coordinator enforces it with one
    grammar matcher per sequence (afd/engine/grammar.py)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # token ids the output must contain before the constraint applies: a reasoning model's
    # end-of-thinking marker (the server sets it when a reasoning parser is on)
    after: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = jsonlib.dumps(self.json)
        given = self._given()
        if len(given) != 1:
            raise SamplingError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, "
                f"grammar; got {given or 'none'}"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise SamplingError(f"structured_outputs.choice must be strings, got {self.choice!r}")

    @property
    def kind(self) -> str:
        return self._given()[0]

    def _given(self) -> list[str]:
        return [name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False)]


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")  # one per request


@message
@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    repetition_penalty: float = 1.0  # > 1 discourages prompt and output tokens; 1.0: off
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token besides the sampled one
    # per prompt token after the first: its logprob and this many top alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        self.validate()
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # as vLLM: raised to its floor
            self.temperature = MIN_TEMPERATURE

    def validate(self) -> None:
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0.0,
                "temperature",
                "must be non-negative and finite",
            ),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1 (disabled) or positive"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs",
                "must be in [0, 20] (or None: off)",
            ),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0,
                "repetition_penalty",
                "must be positive and finite (1.0: off)",
            ),
            (
                all(t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()),
                "logit_bias",
                "must map token ids >= 0 to biases in [-100, 100]",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise SamplingError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
