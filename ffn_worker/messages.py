"""Messages to an FFN rank: the step shape that wakes its serve loop."""

from __future__ import annotations

from dataclasses import dataclass

from transport.codec import message


@message
@dataclass
class StepShape:
    """Tokens each attention rank sends per micro-batch this step: tokens[attn_rank][k]."""

    step: int
    tokens: list[list[int]]
