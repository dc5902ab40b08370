"""Structured outputs (llguidance): generations through LLM.generate, colocated and
disaggregated, that must satisfy their JSON schema, regex, choice or grammar; a bad
constraint fails its request only; the sampler's mask leaves logprobs raw."""

from __future__ import annotations

import json
import re

import pytest
import torch

from afd.engine.grammar import Grammars
from afd.llm import LLM
from afd.sampling_params import SamplingError, SamplingParams, StructuredOutputs
from afd.tokenizer import Tokenizer
from attn_worker.messages import SamplingSpec
from attn_worker.sampler import SeqSamplingState, sample

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "size"],
    "additionalProperties": False,
}
PROMPTS = ["Hello there", "the", "Describe the weather in one word"]


def _texts(llm: LLM, spec: StructuredOutputs, temperature: float, seed: int = 0) -> list:
    params = SamplingParams(
        max_tokens=48, temperature=temperature, seed=seed, structured_outputs=spec
    )
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(str(tiny_ckpt), dtype="float32")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_is_followed(llm: LLM, temperature: float) -> None:
    for text, reason in _texts(llm, StructuredOutputs(json=SCHEMA), temperature):
        assert reason == "stop", text
        value = json.loads(text)
        assert set(value) == {"color", "ok", "size"}
        assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
        assert isinstance(value["size"], int) and 0 <= value["size"] <= 99


def test_regex_choice_and_grammar_are_followed(llm: LLM) -> None:
    for text, reason in _texts(llm, StructuredOutputs(regex=r"[0-9]{3}-[a-c]{2}"), 1.0):
        assert reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-c]{2}", text), text
    for text, reason in _texts(llm, StructuredOutputs(choice=["yes", "no", "maybe"]), 1.0, 5):
        assert reason == "stop" and text in ("yes", "no", "maybe"), text
    lark = 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'
    for text, reason in _texts(llm, StructuredOutputs(grammar=lark), 1.0, 7):
        assert reason == "stop" and re.fullmatch(r"x=[1-9][0-9]?;", text), text


def test_special_token_text_is_spelled_in_text_tokens(llm: LLM) -> None:
    """A regex for a special token's text (here the end-of-turn token's): llguidance allowed
    the special token itself, then refused it, and the request ended with no text
    ("abort"). The text now comes in ordinary tokens."""
    for regex, want in ((r"<\|EOT\|>", "<|EOT|>"), (r"a<\|BOT\|>b", "a<|BOT|>b")):
        for text, reason in _texts(llm, StructuredOutputs(regex=regex), 1.0):
            assert (text, reason) == (want, "stop")


def test_json_object_and_unconstrained_neighbours(llm: LLM) -> None:
    """A constrained request batched with a free one: only the former is constrained."""
    free = SamplingParams(max_tokens=12, temperature=0.0)
    obj = SamplingParams(
        max_tokens=48, temperature=0.0, structured_outputs=StructuredOutputs(json_object=True)
    )
    alone = llm.generate(PROMPTS[:1], free)[0].outputs[0].token_ids
    outs = llm.generate(PROMPTS[:2], [free, obj])
    assert outs[0].outputs[0].token_ids == alone  # the mask did not leak into its row
    text = outs[1].outputs[0].text
    assert text.startswith("{")
    if outs[1].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_bad_constraint_fails_only_its_request(llm: LLM) -> None:
    for spec in (StructuredOutputs(json={"type": "objectx"}), StructuredOutputs(regex="(")):
        with pytest.raises(SamplingError, match=f"structured_outputs.{spec.kind} is invalid"):
            llm.generate(PROMPTS[:1], SamplingParams(structured_outputs=spec))
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4))[0].outputs[0].token_ids


def test_exactly_one_constraint() -> None:
    with pytest.raises(SamplingError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(SamplingError, match="exactly one"):
        StructuredOutputs()


def test_disaggregated_follows_the_same_constraint(tiny_ckpt, llm: LLM) -> None:
    """The masks travel in the StepPlan to attention ranks in other processes: greedy
    constrained tokens equal the colocated engine's."""
    spec = StructuredOutputs(json=SCHEMA)
    params = SamplingParams(max_tokens=48, temperature=0.0, structured_outputs=spec)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    with LLM(str(tiny_ckpt), dtype="float32", colocated=False, attn="2x1", ffn="1x1") as remote:
        got = [o.outputs[0].token_ids for o in remote.generate(PROMPTS, params)]
    assert got == want


def test_sampler_mask_picks_allowed_tokens_and_keeps_raw_logprobs() -> None:
    logits = torch.randn(3, 70)
    allowed = [5, 66]  # neither is the argmax of row 1 below
    logits[1, 7] = 50.0
    words = torch.zeros(3, dtype=torch.int32)  # 70 tokens: 3 words of 32 bits
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    states = {i: SeqSamplingState(SamplingSpec(temperature=0.0, num_logprobs=0)) for i in (0, 1, 2)}
    out = sample(logits, [0, 1, 2], states, {1: words.numpy().tobytes()})
    assert out[1].token_id == max(allowed, key=lambda t: logits[1, t])
    raw = torch.log_softmax(logits, dim=-1)
    assert abs(out[1].logprobs.logprob - float(raw[1, out[1].token_id])) < 1e-5
    assert out[0].token_id == int(logits[0].argmax()) and out[2].token_id == int(logits[2].argmax())


def test_ignore_eos_stops_when_the_grammar_is_complete(llm: LLM) -> None:
    """A complete grammar allows only EOS: the sequence stops there, EOS ignored or not."""
    spec = StructuredOutputs(choice=["yes", "no"])
    for ignore_eos in (False, True):
        params = SamplingParams(max_tokens=10, ignore_eos=ignore_eos, structured_outputs=spec)
        out = llm.generate(PROMPTS[:1], params)[0].outputs[0]
        assert out.text in ("yes", "no") and out.finish_reason == "stop", out


def test_matcher_resumes_past_generated_tokens(tiny_ckpt) -> None:
    """A sequence re-added after a rank restart brings its output: the matcher replays it, and
    an output the grammar rejects fails the sequence."""
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    grammars = Grammars(tok.to_json(), tok.vocab_size, sorted(tok.eos_token_ids))
    spec = StructuredOutputs(regex="[0-9]{3}")
    digits = [tok.encode(d, add_special_tokens=False) for d in "123"]
    assert all(len(d) == 1 for d in digits)  # the tiny tokenizer has single-digit tokens
    grammars.start(1, spec, digits[0] + digits[1])
    assert grammars.advance(1, digits[2][0]) is None  # complete: the EOS comes next
    assert grammars.advance(1, sorted(tok.eos_token_ids)[0]) == "stop"
    letters = tok.encode("ab", add_special_tokens=False)
    with pytest.raises(SamplingError, match="structured_outputs"):
        grammars.start(2, spec, letters)
    (end,) = tok.encode("</think>", add_special_tokens=False)
    after = StructuredOutputs(regex="[0-9]{3}", after=[end])  # free text, marker, 2 digits
    grammars.start(3, after, letters + [end] + digits[0] + digits[1])
    assert 3 not in grammars.waiting and grammars.advance(3, digits[2][0]) is None
    grammars.start(4, after, letters)  # still thinking: no mask yet
    assert 4 in grammars.waiting and grammars.masks([4]) == {}


def test_unusable_tokenizer_refuses_constrained_requests_only(tiny_ckpt) -> None:
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    with pytest.raises(ValueError):  # config vocabulary smaller than the tokenizer's
        Grammars(tok.to_json(), 10, sorted(tok.eos_token_ids))
    with LLM(str(tiny_ckpt), dtype="float32") as llm:
        llm.engine._grammars, llm.engine._no_grammars = None, "vocab size too small"
        spec = StructuredOutputs(regex="a")
        with pytest.raises(SamplingError, match="unavailable: vocab size too small"):
            llm.generate(PROMPTS[:1], SamplingParams(structured_outputs=spec))
        assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))[0].outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_masks_with_cuda_graphs(tiny_ckpt) -> None:
    """bf16 on the GPU with decode graphs: masks built on the host reach the device rows."""
    with LLM(str(tiny_ckpt), device="cuda", dtype="bfloat16", num_kv_blocks=64) as llm:
        for text, reason in _texts(llm, StructuredOutputs(json=SCHEMA), 1.0):
            assert reason == "stop" and json.loads(text)["color"] in ("red", "green", "blue")
        for text, _ in _texts(llm, StructuredOutputs(choice=["yes", "no"]), 0.0):
            assert text in ("yes", "no")


def test_constraint_waits_for_the_reasoning_end(llm: LLM, tiny_ckpt) -> None:
    """With `after` (a reasoning model's `</think>`), only the answer is constrained: free
    text before the marker, the grammar after it."""
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    (end,) = tok.encode("</think>", add_special_tokens=False)
    spec = StructuredOutputs(choice=["yes", "no"], after=[end])
    bias_end = SamplingParams(
        max_tokens=10, temperature=0.0, logit_bias={end: 100.0}, structured_outputs=spec
    )  # the marker comes first, pushed by the bias
    ids = llm.generate(PROMPTS[:1], bias_end)[0].outputs[0].token_ids
    assert ids[0] == end and tok.decode(ids[1:], skip_special_tokens=True) in ("yes", "no")
    no_end = SamplingParams(max_tokens=6, temperature=0.0, logit_bias={end: -100.0})
    free = llm.generate(PROMPTS[:1], no_end)[0].outputs[0].token_ids
    no_end.structured_outputs = spec  # never reaches the marker: never constrained
    assert llm.generate(PROMPTS[:1], no_end)[0].outputs[0].token_ids == free
