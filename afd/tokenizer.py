"""The tokenizer of a checkpoint folder: HF `tokenizers` plus special tokens and chat template.

Reads tokenizer.json, tokenizer_config.json (bos/eos, chat template) and generation_config.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from afd.server.chat_template import STEP3_CHAT_TEMPLATE, load_chat_template, render_chat


class Tokenizer:
    """Encode/decode text and render chats for one checkpoint."""

    def __init__(
        self,
        hf: HFTokenizer,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._hf = hf
        config = config or {}
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_token_id = self._id_or_none(self.bos_token)
        self.eos_token_id = self._id_or_none(self.eos_token)
        self.eos_token_ids = self._collect_eos_ids(generation_config or {})
        self.special_token_ids: set[int] = {
            i for i, tok in hf.get_added_tokens_decoder().items() if tok.special
        }
        # Already-resolved template source; from_pretrained finds it in the folder.
        self.chat_template = chat_template or STEP3_CHAT_TEMPLATE

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load from a checkpoint folder; chat_template overrides the folder's (file or source)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{tok_file} not found: the checkpoint folder must contain a HF tokenizer.json"
            )
        try:
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"cannot load {tok_file}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        generation_config = _read_json(folder / "generation_config.json")
        template = load_chat_template(folder, chat_template)
        return cls(hf, config, generation_config, template)

    def to_json(self) -> str:
        """The HF tokenizer.json text (structured outputs build their token trie from it)."""
        return self._hf.to_str()

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not): the server
        # tokenizes in a thread, and a long prompt must not stall every other request
        return self._hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for, bounded by its vocabulary
        string's bytes (a byte-level token's string has a character per byte; a piece's "▁"
        or "<0x41>" stands for fewer bytes than it takes), so a text of B bytes needs at
        least B / this many tokens, unless a normalizer deletes text."""
        return max(len(t.encode("utf-8")) for t in self._hf.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render messages into a prompt string (tokenize it with add_special_tokens=False)."""
        kwargs.setdefault("bos_token", self.bos_token or "")
        kwargs.setdefault("eos_token", self.eos_token or "")
        return render_chat(self.chat_template, messages, tools, add_generation_prompt, **kwargs)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._hf.token_to_id(token)

    def _collect_eos_ids(self, generation_config: dict[str, Any]) -> list[int]:
        # generation_config.json may name extra stop ids (an int or a list) beyond the eos token.
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        extra = generation_config.get("eos_token_id")
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        if self.eos_token_id is None and ids:
            self.eos_token_id = ids[0]
        return ids


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data
