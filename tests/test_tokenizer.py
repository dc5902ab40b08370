"""Tokenizer loading, encode/decode round trips and the tiny tokenizer's special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afd.models.tiny_tokenizer import MARKER_TOKENS, SPECIAL_TOKENS, write_tiny_tokenizer
from afd.server.chat_template import STEP3_CHAT_TEMPLATE
from afd.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs",
    "Café naïve résumé — déjà vu",
    "中文测试：你好，世界！",
    "emoji 😀🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "def f(x: int) -> int:\n    return x * 2  # comment\n",
    'JSON {"a": [1, 2.5, null], "b": "ü"}',
    "unseen script: ქართული Ꭰ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


def test_vocab_size_and_determinism(tmp_path: Path, tiny_dir: Path, tok: Tokenizer) -> None:
    size = write_tiny_tokenizer(tmp_path)
    assert size == tok.vocab_size
    assert 300 <= size <= 1100
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
def test_no_token_stands_for_more_than_max_token_bytes(tok: Tokenizer, text: str) -> None:
    """The server refuses a prompt before tokenizing it when its bytes exceed max_model_len x
    max_token_bytes, so that bound must hold: per token, and over whole texts (the special
    tokens' text included)."""
    long = (text + " <|BOT|> The user asked a question") * 3
    assert len(tok.encode(long)) >= len(long.encode()) / tok.max_token_bytes
    for i in tok.encode(long, add_special_tokens=True):
        assert len(tok.decode([i], skip_special_tokens=False).encode()) <= tok.max_token_bytes


def test_merges_compress_common_text(tok: Tokenizer) -> None:
    text = "The user asked a question and the assistant answered it."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_every_step3_token_is_one_token(tok: Tokenizer) -> None:
    for token in SPECIAL_TOKENS + MARKER_TOKENS:
        token_id = tok.token_to_id(token)
        assert token_id is not None, token
        assert tok.encode(f"a{token}b")[1:-1] == [token_id]
        assert tok.id_to_token(token_id) == token


def test_skip_special_keeps_think_and_tool_markers(tok: Tokenizer) -> None:
    text = "<|BOT|>assistant\n<think>\nhm</think><｜tool_calls_begin｜><｜tool_call_begin｜>"
    text += "function<｜tool_sep｜>x<｜tool_call_end｜><｜tool_calls_end｜><|EOT|><im_patch>"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    kept = tok.decode(ids, skip_special_tokens=True)
    assert kept == text.replace("<|BOT|>", "").replace("<|EOT|>", "").replace("<im_patch>", "")
    marker_ids = {tok.token_to_id(t) for t in MARKER_TOKENS}
    assert not marker_ids & tok.special_token_ids
    assert {tok.token_to_id(t) for t in SPECIAL_TOKENS} == tok.special_token_ids


def test_bos_eos(tok: Tokenizer) -> None:
    eot = tok.token_to_id("<|EOT|>")
    assert tok.eos_token_id == eot and tok.eos_token_ids == [eot]
    assert tok.bos_token_id == tok.token_to_id("<｜begin▁of▁sentence｜>")
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id, *tok.encode("hi")]


def test_unknown_token_lookups(tok: Tokenizer) -> None:
    assert tok.token_to_id("<no such token>") is None
    assert tok.id_to_token(10**6) is None


def test_generation_config_eos_ids(tmp_path: Path, tiny_dir: Path) -> None:
    _copy_tokenizer(tiny_dir, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_ids == [2, 7]


def test_config_tokens_as_dicts_and_no_eos(tmp_path: Path, tiny_dir: Path) -> None:
    _copy_tokenizer(tiny_dir, tmp_path, with_config=False)
    config = {"bos_token": {"content": "<｜begin▁of▁sentence｜>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_token_id == 0
    assert tok.eos_token_id is None and tok.eos_token_ids == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_id == 2


def test_missing_tokenizer_json_names_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_broken_files_name_file(tmp_path: Path, tiny_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    _copy_tokenizer(tiny_dir, tmp_path, with_config=False)
    (tmp_path / "tokenizer_config.json").write_text("[")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_comes_from_config(tok: Tokenizer) -> None:
    assert tok.chat_template == STEP3_CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi 😀"}])
    assert prompt == "<｜begin▁of▁sentence｜><|BOT|>user\nHi 😀<|EOT|><|BOT|>assistant\n<think>\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=False) == prompt


def test_chat_template_override(tmp_path: Path, tiny_dir: Path) -> None:
    _copy_tokenizer(tiny_dir, tmp_path)
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    tok = Tokenizer.from_pretrained(tmp_path, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    (tmp_path / "t.jinja").write_text("{{ bos_token }}{{ messages | length }}")
    tok = Tokenizer.from_pretrained(tmp_path, chat_template=str(tmp_path / "t.jinja"))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == f"{tok.bos_token}1"


def _copy_tokenizer(src: Path, dst: Path, with_config: bool = True) -> None:
    names = ["tokenizer.json"] + (["tokenizer_config.json"] if with_config else [])
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
