"""Incremental detokenization matches one-shot decoding; stop strings truncate and hold back."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from afd.detokenizer import IncrementalDetokenizer, find_stop, safe_emit_length
from afd.models.tiny_tokenizer import write_tiny_tokenizer
from afd.tokenizer import Tokenizer

TEXTS = [
    "Plain ASCII, with punctuation!",
    "Café déjà vu — naïve",
    "中文测试：你好，世界！日本語 한국어",
    "emoji 😀🚀🎉 family 👨‍👩‍👧 flag 🇫🇷 and 𝔘𝔫𝔦",
    "<think>\nreasoning 😀</think>answer<｜tool_calls_begin｜>x<｜tool_calls_end｜><|EOT|>",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def stream(
    tok: Tokenizer, ids: list[int], skip: bool = True, prompt: Sequence[int] = ()
) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_valid_text_streams_without_replacement_chars(
    tok: Tokenizer, text: str, skip: bool
) -> None:
    ids = tok.encode(text)
    deltas = stream(tok, ids, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left held back for flush


def byte_tokens(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the worst case for splitting characters."""
    ids = [tok.token_to_id(_BYTE_CHARS[b]) for b in text.encode()]
    assert None not in ids
    return ids


def _gpt2_byte_chars() -> dict[int, str]:
    # The GPT-2 byte-to-char table used by ByteLevel: printable bytes map to themselves.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


_BYTE_CHARS = _gpt2_byte_chars()


def test_split_character_emits_nothing_until_complete(tok: Tokenizer) -> None:
    ids = byte_tokens(tok, "a😀b中")
    assert len(ids) == 9
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas == ["a", "", "", "", "😀", "b", "", "", "中"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_split_text_at_every_position(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for cut in range(len(ids) + 1):
        deltas = stream(tok, ids[:cut])
        assert "".join(deltas) == tok.decode(ids[:cut])
    deltas = stream(tok, byte_tokens(tok, "é中😀 ok"))
    assert "".join(deltas) == "é中😀 ok" and "\ufffd" not in "".join(deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_one_shot_decode(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    out = tok.encode("Bonjour, café 😀 done")
    assert "".join(stream(tok, out, prompt=prompt)) == tok.decode(out)


def test_find_stop() -> None:
    assert find_stop("hello world", ["xyz"]) == ("hello world", None)
    assert find_stop("hello world", ["world", "lo"]) == ("hel", "lo")
    assert find_stop("hello world", ["o w", "o"]) == ("hell", "o w")
    assert find_stop("hello world", ["wor"], include_stop=True) == ("hello wor", "wor")
    assert find_stop("ab ab", ["ab"], search_from=1) == ("ab ", "ab")
    assert find_stop("abc", [""]) == ("abc", None)
    assert find_stop("x</s>", ["</s>"]) == ("x", "</s>")


def test_safe_emit_length() -> None:
    assert safe_emit_length("hello wor", ["world"]) == 6
    assert safe_emit_length("hello", ["world"]) == 5
    assert safe_emit_length("hello w", ["world", "lo w!"]) == 3
    assert safe_emit_length("ab", ["abcdef"]) == 0
    assert safe_emit_length("abc", []) == 3
    assert safe_emit_length("", ["x"]) == 0


def test_streaming_with_stop_strings(tok: Tokenizer) -> None:
    """Emit only safe text each step; the emitted stream equals the truncated full text."""
    stops = ["STOP", "中文"]
    ids = tok.encode("Some text 😀 before 中 and then 中文 after")
    detok = IncrementalDetokenizer(tok)
    sent, stop = "", None
    for i in ids:
        detok.add(i)
        text, stop = find_stop(detok.text, stops)
        end = len(text) if stop else safe_emit_length(text, stops)
        assert detok.text.startswith(sent) and end >= len(sent)
        sent = text[:end]
        if stop:
            break
    assert stop == "中文" and sent == "Some text 😀 before 中 and then "
