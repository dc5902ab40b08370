"""The interface the HTTP server needs from the engine: generate, abort, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from afd.outputs import RequestOutput
from afd.sampling_params import SamplingParams

if TYPE_CHECKING:
    from afd.tokenizer import Tokenizer


class EngineError(RuntimeError):
    """The engine failed this request; the message says why. Served as HTTP 500, so raise it
    only for real engine faults, never for bad input."""


class EngineClient(Protocol):
    tokenizer: Tokenizer
    vocab_size: int  # the logits' width (config.json), which structured-output masks cover
    model_name: str
    model_root: str  # checkpoint path, for /v1/models "root"
    max_model_len: int

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield CUMULATIVE snapshots (detokenized, stop strings applied, one CompletionOutput
        per choice); the last has finished=True and every choice a finish_reason."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop the request and free its KV blocks."""
        ...

    def is_healthy(self) -> bool: ...
