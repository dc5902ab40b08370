"""Engine logprobs (vLLM's tables, token id -> Logprob, per generated or prompt token) in
OpenAI's two shapes and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from afd.outputs import Logprob
from afd.server.protocol_responses import (
    ChatLogprob,
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)

MIN_LOGPROB = -9999.0  # JSON has no -inf


class LogprobFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_str = lru_cache(maxsize=1 << 16)(self._decode_token)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def _top(table: dict[int, Logprob], n: int) -> list[tuple[int, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1].logprob)[:n]
        return [(i, max(lp.logprob, MIN_LOGPROB)) for i, lp in ranked]

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.token_str(token_id)
        logprob = max(logprob, MIN_LOGPROB)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    def chat(self, ids: list[int], lps: list[dict[int, Logprob]], top_n: int) -> ChatLogprobs:
        """Chat shape: one entry per token with its `top_n` alternatives."""
        entries = []
        for tid, table in zip(ids, lps, strict=False):
            entry = self._entry(tid, _value(table, tid))
            top = [self._entry(i, lp) for i, lp in self._top(table, top_n)]
            entries.append(ChatLogprob(**entry.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=entries)

    def completion(
        self, ids: list[int], lps: list[dict[int, Logprob] | None], top_n: int, offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Legacy completions shape; returns it and the text offset after these tokens. A None
        table (the first prompt token, when echoed) gives null logprobs, as OpenAI's."""
        # every field passed in: streams dump with exclude_unset, which drops defaults
        out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for tid, table in zip(ids, lps, strict=False):
            token = self.token_str(tid)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            if table is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            logprob = max(_value(table, tid), MIN_LOGPROB)
            top = {self.token_str(i): lp for i, lp in self._top(table, top_n)}
            top.setdefault(token, logprob)  # the sampled token is always listed
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(top)
        return out, offset

    @staticmethod
    def prompt(tables: list[dict[int, Logprob] | None]) -> PromptLogprobs:
        """vLLM's `prompt_logprobs` field, -inf clamped as everywhere in the API."""
        return [
            None
            if table is None
            else {
                i: PromptLogprob(
                    logprob=max(lp.logprob, MIN_LOGPROB),
                    rank=lp.rank,
                    decoded_token=lp.decoded_token,
                )
                for i, lp in table.items()
            }
            for table in tables
        ]


def _value(table: dict[int, Logprob], token_id: int) -> float:
    entry = table.get(token_id)
    return MIN_LOGPROB if entry is None else entry.logprob
