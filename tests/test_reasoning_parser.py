"""Step3 reasoning parser: whole-text split and streaming split at every position."""

from __future__ import annotations

import itertools

import pytest

from afd.server.reasoning_parser import (
    REASONING_PARSERS,
    ReasoningStream,
    Step3ReasoningParser,
    create_reasoning_parser,
    extract_reasoning,
    held_prefix_len,
)

PARSER = Step3ReasoningParser()
CASES = [
    ("Let me think. 2+2=4.</think>The answer is 4.", "Let me think. 2+2=4.", "The answer is 4."),
    ("no end marker, all reasoning <", "no end marker, all reasoning <", None),
    ("</think>only answer", None, "only answer"),
    ("only reasoning</think>", "only reasoning", None),
    ("a</think>b</think>c", "a", "b</think>c"),  # only the first marker splits
    ("x </thin k> y</think>\n\nz", "x </thin k> y", "\n\nz"),
    ("", None, None),
]


def stream(chunks: list[str], in_reasoning: bool = True) -> tuple[str, str, list[str]]:
    """Feed cumulative text chunk by chunk; return joined reasoning, content and all deltas."""
    s = ReasoningStream(PARSER, in_reasoning)
    text, reasoning, content, deltas = "", "", "", []
    for i, chunk in enumerate(chunks):
        text += chunk
        r, c = s.update(text, final=i == len(chunks) - 1)
        reasoning, content = reasoning + r, content + c
        deltas += [r, c]
    return reasoning, content, deltas


def test_registry() -> None:
    assert "step3" in REASONING_PARSERS
    assert isinstance(create_reasoning_parser("step3"), Step3ReasoningParser)
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        create_reasoning_parser("nope")


@pytest.mark.parametrize("text,reasoning,content", CASES)
def test_extract_whole(text: str, reasoning: str | None, content: str | None) -> None:
    assert extract_reasoning(PARSER, text, in_reasoning=True) == (reasoning, content)


def test_not_in_reasoning_is_all_content() -> None:
    assert extract_reasoning(PARSER, "a</think>b", in_reasoning=False) == (None, "a</think>b")


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("<|BOT|>user\nhi<|EOT|><|BOT|>assistant\n<think>\n", True),
        ("<|BOT|>user\nhi<|EOT|><|BOT|>assistant\n", True),  # Step3 default: reasoning
        ("<|BOT|>assistant\n<think>\n\n</think>\n", False),  # thinking switched off
        ("<think>old</think>answer<|EOT|><|BOT|>assistant\n<think>\n", True),
    ],
)
def test_starts_in_reasoning(prompt: str, expected: bool) -> None:
    assert PARSER.starts_in_reasoning(prompt) is expected


def test_held_prefix_len() -> None:
    assert held_prefix_len("abc</th", "</think>") == 4
    assert held_prefix_len("abc<", "</think>") == 1
    assert held_prefix_len("abc", "</think>") == 0
    assert held_prefix_len("</think>", "</think>") == 0  # a whole marker is not a prefix


@pytest.mark.parametrize("text,reasoning,content", CASES)
def test_stream_split_at_every_position(text: str, reasoning: str, content: str) -> None:
    want = (reasoning or "", content or "")
    for i in range(len(text) + 1):
        # A leaked piece of the marker would show up in the joined output.
        assert stream([text[:i], text[i:]])[:2] == want, f"split at {i}"


@pytest.mark.parametrize("text,reasoning,content", CASES[:2])
def test_stream_split_at_every_pair_of_positions(text: str, reasoning: str, content: str) -> None:
    want = (reasoning or "", content or "")
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert stream([text[:i], text[i:j], text[j:]])[:2] == want, f"split at {i},{j}"


def test_stream_char_by_char_never_leaks_marker() -> None:
    text = CASES[0][0]
    r, c, deltas = stream(list(text))
    assert (r, c) == (CASES[0][1], CASES[0][2])
    assert all("<" not in d for d in deltas)  # the marker's "<" was held, then dropped


def test_stream_holds_partial_marker_until_final() -> None:
    s = ReasoningStream(PARSER, in_reasoning=True)
    assert s.update("thinking </thi", final=False) == ("thinking ", "")
    assert s.update("thinking </thi", final=True) == ("</thi", "")  # never completed


def test_stream_not_in_reasoning() -> None:
    r, c, _ = stream(["hello ", "</think> world"], in_reasoning=False)
    assert (r, c) == ("", "hello </think> world")


def test_stream_searches_only_new_text() -> None:
    # Rescanning the whole output on every token would be quadratic in its length.
    parser = Step3ReasoningParser()
    starts: list[tuple[int, int]] = []
    find_end = parser.find_end

    def spy(text: str, start: int = 0) -> tuple[int, int] | None:
        starts.append((len(text), start))
        return find_end(text, start)

    parser.find_end = spy  # type: ignore[method-assign]
    text = "abcdefgh" * 100 + "</think>" + "tail"
    s = ReasoningStream(parser, in_reasoning=True)
    for i in range(1, len(text) + 1):
        s.update(text[:i], final=False)
    assert starts and all(n - start <= len("</think>") for n, start in starts)
    assert len(starts) == 800 + len("</think>")  # no search once the marker was found
