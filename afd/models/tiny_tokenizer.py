"""A tiny byte-level BPE tokenizer with all Step3 special tokens, trained offline in milliseconds.

Used by `afd make-tiny-model` so that tests and the tiny model run without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from afd.server.chat_template import STEP3_CHAT_TEMPLATE

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
BOT_TOKEN = "<|BOT|>"
EOT_TOKEN = "<|EOT|>"
# Dropped by decode(skip_special_tokens=True): turn framing and image placeholders.
SPECIAL_TOKENS = [
    BOS_TOKEN,
    BOT_TOKEN,
    EOT_TOKEN,
    "<im_patch>",
    "<im_start>",
    "<im_end>",
    "<patch_start>",
    "<patch_end>",
    "<patch_newline>",
]
# Kept by decode(skip_special_tokens=True): the reasoning and tool parsers must see them.
MARKER_TOKENS = [
    "<think>",
    "</think>",
    "<｜tool_calls_begin｜>",
    "<｜tool_calls_end｜>",
    "<｜tool_call_begin｜>",
    "<｜tool_call_end｜>",
    "<｜tool_sep｜>",
]
NUM_MERGES = 700

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A tiny model still needs a real tokenizer.
Hello, world! How are you today? I am fine, thank you. What is the weather in Paris?
The user asked a question and the assistant answered it. The system prompt sets the rules.
Mixture-of-experts models route every token to a few experts; attention runs separately.
Tokens per second, time to first token, and inter-token latency are the numbers that matter.
Once upon a time there was a little robot who wanted to learn how to write poems.
It is sunny today, with a high of 23 degrees and a low of 14. Tomorrow it will rain.
Let me think step by step. First, add the numbers: 12 + 30 = 42. Then multiply by 2.
I will call the get_weather function with the city parameter set to Paris and days to 3.
function parameter invoke steptml name city days location unit celsius fahrenheit query
user assistant system tool think reasoning answer content message role tools arguments
def add(a: int, b: int) -> int:
    return a + b

class Counter:
    def __init__(self) -> None:
        self.count = 0

    def increment(self, step: int = 1) -> int:
        self.count += step
        return self.count

for i in range(10):
    print(f"value {i}: {i * i}")

import json
data = {"name": "afd", "version": "0.1.0", "tags": ["moe", "serving"], "ok": true}
print(json.dumps(data, indent=2))
if (x > 0 && y < 10) { return x * y; } else { return -1; }
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name;
Café, naïve, résumé, déjà vu, crème brûlée, façade, élève, où, à bientôt.
Ünïcödé text: Straße, año, smörgåsbord, Ærø, Łódź, Ελληνικά, русский язык.
中文测试：你好，世界！今天天气很好。我们正在测试分词器。模型、专家、注意力。
日本語のテキストも少し。こんにちは。한국어 텍스트도 조금. 안녕하세요.
Emoji: 😀 😂 🚀 🎉 👍 ❤️ 🔥 🤖 🌍 ✨ — and symbols: ± × ÷ ≤ ≥ ≠ ∞ € £ ¥ © ™.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -7 1e-5 0x1F 2025-07-28.
"""


def _train() -> Tokenizer:
    """Train the BPE on the built-in corpus; byte-level so any text (emoji included) encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + NUM_MERGES,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    # encode(add_special_tokens=True) prepends BOS, as HF Llama/DeepSeek tokenizers do.
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tok


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": EOT_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 65536,
        "chat_template": STEP3_CHAT_TEMPLATE,
    }


def write_tiny_tokenizer(out_dir: Path) -> int:
    """Write tokenizer.json and tokenizer_config.json into out_dir; return the vocab size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train()
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)
