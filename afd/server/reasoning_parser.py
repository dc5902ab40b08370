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

    def find_end(self, text: str, start: int = 0) -> tuple[int, int] | None:
        """(where the end marker starts, where the answer starts), searching from `start`."""
        at = text.find(self.end_marker, start)
        return None if at < 0 else (at, at + len(self.end_marker))

    def split(self, text: str, in_reasoning: bool) -> tuple[str, str]:
        """(reasoning, content) of a finished output."""
        if not in_reasoning:
            return "", text
        found = self.find_end(text)
        return (text, "") if found is None else (text[: found[0]], text[found[1] :])


@register_reasoning_parser("step3")
class Step3ReasoningParser(ReasoningParser):
    """Step3: the generation prompt opens `<think>`, so all text before the first `</think>`
    is reasoning; without `</think>` the whole output is reasoning."""

    start_marker = "<think>"
    end_marker = "</think>"

    def starts_in_reasoning(self, prompt: str) -> bool:
        # Thinking is off only if the prompt itself closed the last think block
        # (e.g. a template rendering `enable_thinking=False` as an empty block).
        return prompt.rfind(self.end_marker) <= prompt.rfind(self.start_marker)


def extract_reasoning(
    parser: ReasoningParser, text: str, in_reasoning: bool
) -> tuple[str | None, str | None]:
    """Non-streaming split; empty parts become None (OpenAI's `content: null`)."""
    reasoning, content = parser.split(text, in_reasoning)
    return reasoning or None, content or None


class ReasoningStream:
    """Per-choice streaming state: cumulative text in, (reasoning, content) deltas out.

    Work per update is proportional to the new text: the marker is searched for only past
    what was already emitted (a possible marker start is always held back)."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool) -> None:
        self.parser = parser
        self.in_reasoning = in_reasoning
        self.num_reasoning = 0  # characters already emitted
        self.num_content = 0
        self.end: tuple[int, int] | None = None  # find_end's answer once the marker is seen

    def update(self, text: str, final: bool) -> tuple[str, str]:
        if not self.in_reasoning:
            delta = text[self.num_content :]
            self.num_content = len(text)
            return "", delta
        if self.end is None:
            self.end = self.parser.find_end(text, self.num_reasoning)
        if self.end is None:
            held = 0 if final else held_prefix_len(text, self.parser.end_marker)
            return self._reasoning(text, len(text) - held), ""
        reasoning = self._reasoning(text, self.end[0])
        content = text[self.end[1] + self.num_content :]
        self.num_content += len(content)
        return reasoning, content

    def _reasoning(self, text: str, upto: int) -> str:
        delta = text[self.num_reasoning : upto]
        self.num_reasoning = max(self.num_reasoning, upto)
        return delta
