"""Reasoning parsers: split generated text into reasoning and answer (`--reasoning-parser`).

Parsers work on the cumulative text of a choice. `ReasoningStream` turns successive
snapshots into deltas and holds back any tail that could be the start of a marker, so a
marker split across engine outputs at any position is never leaked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {}


def register_reasoning_parser(name: str) -> Callable[[type[ReasoningParser]], type]:
    def wrap(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        REASONING_PARSERS[name] = cls
        return cls

    return wrap


def create_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {known}")
    return REASONING_PARSERS[name]()


def held_prefix_len(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningParser(ABC):
    end_marker: str  # the text that ends reasoning; it must reach the parser undeleted

    @abstractmethod
    def starts_in_reasoning(self, prompt: str) -> bool:
        """Whether generation begins inside the reasoning block, judged from the prompt."""

    @abstractmethod
    def split(self, text: str, in_reasoning: bool, final: bool) -> tuple[str, str]:
        """(reasoning, content) that can be shown for cumulative `text`; when not `final`,
        text that may still turn into a marker is left out of both."""


@register_reasoning_parser("step3")
class Step3ReasoningParser(ReasoningParser):
    """Step3: the generation prompt opens `<think>`, so all text before the first `</think>`
    is reasoning; without `</think>` the whole output is reasoning."""

    start = "<think>"
    end = end_marker = "</think>"

    def starts_in_reasoning(self, prompt: str) -> bool:
        # Thinking is off only if the prompt itself closed the last think block
        # (e.g. a template rendering `enable_thinking=False` as an empty block).
        return prompt.rfind(self.end) <= prompt.rfind(self.start)

    def split(self, text: str, in_reasoning: bool, final: bool) -> tuple[str, str]:
        if not in_reasoning:
            return "", text
        idx = text.find(self.end)
        if idx >= 0:
            return text[:idx], text[idx + len(self.end) :]
        if final:
            return text, ""
        return text[: len(text) - held_prefix_len(text, self.end)], ""


def extract_reasoning(
    parser: ReasoningParser, text: str, in_reasoning: bool
) -> tuple[str | None, str | None]:
    """Non-streaming split; empty parts become None (OpenAI's `content: null`)."""
    reasoning, content = parser.split(text, in_reasoning, final=True)
    return reasoning or None, content or None


class ReasoningStream:
    """Per-choice streaming state: cumulative text in, (reasoning, content) deltas out."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool) -> None:
        self.parser = parser
        self.in_reasoning = in_reasoning
        self.num_reasoning = 0  # characters already emitted
        self.num_content = 0

    def update(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = self.parser.split(text, self.in_reasoning, final)
        r_delta, c_delta = reasoning[self.num_reasoning :], content[self.num_content :]
        self.num_reasoning, self.num_content = len(reasoning), len(content)
        return r_delta, c_delta
