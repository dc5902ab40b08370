"""Streaming detokenization: token ids in, text deltas out, plus stop-string matching.

Byte-level tokens can split a UTF-8 character, so text is only emitted once it decodes cleanly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context so the first generated token renders as in a full decode.
_PROMPT_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """vLLM-style prefix/read offsets: decode ids[prefix:read] and ids[prefix:] and emit the
    difference, holding back while the tail is an incomplete character (decodes to U+FFFD)."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """Append one generated token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(new_text[len(prefix_text) :])

    def add_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of generation, emit any held-back tail even if it is invalid UTF-8."""
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text):
            return ""
        return self._advance(new_text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip)
        new_text = decode(self.ids[self.prefix_offset :], skip)
        return prefix_text, new_text

    def _advance(self, delta: str) -> str:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop(
    text: str, stops: Sequence[str], include_stop: bool = False, search_from: int = 0
) -> tuple[str, str | None]:
    """Truncate text at the earliest stop string found at or after search_from.

    Returns (text, None) when no stop occurs, else (text cut before the stop, or just after it
    when include_stop, the stop that hit). Pass search_from = old length - longest stop + 1 when
    called on a growing text so each call only scans the new part.
    """
    best_at, best_stop = len(text) + 1, ""
    for stop in stops:
        at = text.find(stop, max(search_from, 0)) if stop else -1
        # Earliest start wins; on a tie the longer stop, so the cut covers the whole match.
        if 0 <= at and (at < best_at or (at == best_at and len(stop) > len(best_stop))):
            best_at, best_stop = at, stop
    if not best_stop:
        return text, None
    end = best_at + len(best_stop) if include_stop else best_at
    return text[:end], best_stop


def safe_emit_length(text: str, stops: Sequence[str]) -> int:
    """How much of text can be streamed now: hold back a tail that may begin a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return len(text) - hold
