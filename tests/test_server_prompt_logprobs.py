"""Prompt logprobs over HTTP (fake engine): completions' echo with logprobs puts the prompt's
tokens in front of the generated ones, JSON and streamed; vLLM's `prompt_logprobs` extra on
completions and chat. Raw JSON: OpenAI's echo answers carry nulls the SDK types forbid."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fake_engine import FakeEngine, fake_http, running_server

from afd.server.api_server import ServerSettings, build_app

PROMPT = "Hi there, friend"


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def http(engine: FakeEngine) -> Iterator[httpx.Client]:
    with fake_http(engine) as client:
        yield client


def complete(http: httpx.Client, **fields: object) -> dict:
    r = http.post("/v1/completions", json={"model": "tiny-step3", "prompt": PROMPT, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(http: httpx.Client, **fields: object) -> list[dict]:
    body = {"model": "tiny-step3", "prompt": PROMPT, "stream": True, **fields}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def token_strs(engine: FakeEngine, ids: list[int]) -> list[str]:
    return [engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]


def test_echo_with_logprobs_puts_the_prompt_in_front(http: httpx.Client, engine: FakeEngine):
    plain = complete(http, logprobs=2, max_tokens=4)["choices"][0]
    body = complete(http, echo=True, logprobs=2, max_tokens=4)
    prompt_ids = engine.last_prompt
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    n = len(prompt_ids)
    assert choice["text"] == PROMPT + plain["text"]
    assert lp["tokens"] == token_strs(engine, prompt_ids) + plain["logprobs"]["tokens"]
    # the first prompt token has nothing before it: null, as OpenAI's legacy API answers
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx([-0.5 - j / 100 for j in range(1, n)])
    assert lp["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]
    assert lp["top_logprobs"][n:] == plain["logprobs"]["top_logprobs"]
    for j in range(1, n):
        top = lp["top_logprobs"][j]
        assert len(top) == 2 and top[lp["tokens"][j]] == lp["token_logprobs"][j]
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    # and vLLM's field beside it, the same values
    tables = choice["prompt_logprobs"]
    assert len(tables) == n and tables[0] is None
    for j in range(1, n):
        entry = tables[j][str(prompt_ids[j])]
        assert entry["logprob"] == lp["token_logprobs"][j] and entry["rank"] == 1
        assert entry["decoded_token"] == lp["tokens"][j]
    assert engine.last_params.prompt_logprobs == 2


def test_echo_with_logprobs_and_no_tokens_is_the_prompt_alone(http: httpx.Client, engine):
    body = complete(http, echo=True, logprobs=1, max_tokens=0, n=2)
    n = len(engine.last_prompt)
    assert engine.last_params.max_tokens == 1  # one token computes the prompt's logprobs
    assert engine.last_params.n == 1  # for both choices
    assert body["usage"]["completion_tokens"] == 0
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    for choice in body["choices"]:
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == n and lp["token_logprobs"][0] is None
        assert all(v is not None for v in lp["token_logprobs"][1:])
    assert not engine.in_flight


def test_streamed_echo_sends_the_prompt_logprobs_first(http: httpx.Client, engine: FakeEngine):
    whole = complete(http, echo=True, logprobs=1, max_tokens=5)["choices"][0]
    chunks = stream_chunks(http, echo=True, logprobs=1, max_tokens=5)
    n = len(engine.last_prompt)
    first = chunks[0]["choices"][0]
    assert first["text"].startswith(PROMPT)
    assert len(first["logprobs"]["tokens"]) > n  # the prompt's, then the first token's
    assert first["logprobs"]["token_logprobs"][0] is None
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    merged["text_offset"] = []
    for chunk in chunks:
        for key in merged:
            merged[key] += chunk["choices"][0]["logprobs"][key]
    assert merged == whole["logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_prompt_logprobs_extra_on_completions_and_chat(http: httpx.Client, engine: FakeEngine):
    body = complete(http, prompt_logprobs=3, max_tokens=2)
    (choice,) = body["choices"]
    assert choice["logprobs"] is None  # only what was asked
    tables = choice["prompt_logprobs"]
    ids = engine.last_prompt
    assert tables[0] is None and len(tables) == len(ids)
    for j in range(1, len(ids)):
        assert len(tables[j]) == 3
        assert sorted(e["rank"] for e in tables[j].values()) == [1, 2, 3]
        assert tables[j][str(ids[j])]["logprob"] == pytest.approx(-0.5 - j / 100)
    assert complete(http, max_tokens=2)["choices"][0]["prompt_logprobs"] is None
    msgs = [{"role": "user", "content": "Say hello."}]
    r = http.post(
        "/v1/chat/completions",
        json={"model": "tiny-step3", "messages": msgs, "max_tokens": 2, "prompt_logprobs": 0},
    )
    assert r.status_code == 200, r.text
    tables, ids = r.json()["prompt_logprobs"], engine.last_prompt
    assert tables[0] is None and len(tables) == len(ids) > 1
    assert all(list(t) == [str(i)] for t, i in zip(tables[1:], ids[1:], strict=True))


def test_streamed_echo_waits_for_prompt_logprobs_when_a_choice_finishes_first() -> None:
    """n=2: choice 1 ends at its first token, before the prompt's logprobs arrive (they come
    with choice 0's first token in the engine, and choice 1 may come from the prefix cache).
    Its one chunk must still carry the prompt in front."""
    replies = {0: "Hello there, this is a much longer reply.", 1: ""}  # 1: EOS at once
    engine = FakeEngine(reply=lambda prompt, i: replies[i])
    engine.prompt_logprobs_after = 2
    with running_server(build_app(engine, ServerSettings())) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            chunks = stream_chunks(client, echo=True, logprobs=1, max_tokens=8, n=2)
    prompt_len = len(engine.last_prompt)
    firsts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            firsts.setdefault(choice["index"], choice)
    assert set(firsts) == {0, 1}
    for choice in firsts.values():
        assert choice["text"].startswith(PROMPT)
        assert len(choice["logprobs"]["tokens"]) >= prompt_len
        assert choice["logprobs"]["token_logprobs"][0] is None
