"""Generated tokens' logprobs over HTTP (fake engine), field by field: the engine's Logprob
tables in OpenAI's chat shape (`content[].top_logprobs`) and legacy completions shape
(`token_logprobs`, `top_logprobs`), JSON and streamed. Raw JSON, to pin the exact bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fake_engine import DEFAULT_REPLY, FakeEngine, fake_http

MODEL = "tiny-step3"
NUM_TOKENS = 4


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def http(engine: FakeEngine) -> Iterator[httpx.Client]:
    with fake_http(engine) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json={"model": MODEL, "max_tokens": NUM_TOKENS, **body})
    assert r.status_code == 200, r.text
    return r.json()


def streamed(http: httpx.Client, path: str, body: dict) -> list[dict]:
    body = {"model": MODEL, "max_tokens": NUM_TOKENS, "stream": True, **body}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def reply_tokens(engine: FakeEngine) -> list[tuple[int, str]]:
    """The fake engine's first tokens and their text; each is its own most likely token
    (-0.25), its successors in the vocabulary the next (-2.0, -3.0, ...)."""
    ids = engine.tokenizer.encode(DEFAULT_REPLY.format(i=0))[:NUM_TOKENS]
    return [(t, engine.tokenizer.decode([t], skip_special_tokens=False)) for t in ids]


def text(engine: FakeEngine, token: int) -> str:
    return engine.tokenizer.decode([token], skip_special_tokens=False)


def chat_entry(engine: FakeEngine, token: int, value: float) -> dict:
    s = text(engine, token)
    return {"token": s, "logprob": value, "bytes": list(s.encode())}


def test_chat_body(http: httpx.Client, engine: FakeEngine) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2}
    got = post(http, "/v1/chat/completions", body)["choices"][0]["logprobs"]
    want = [
        {
            **chat_entry(engine, t, -0.25),
            "top_logprobs": [chat_entry(engine, t, -0.25), chat_entry(engine, t + 1, -2.0)],
        }
        for t, _ in reply_tokens(engine)
    ]
    assert got == {"content": want}
    chunks = streamed(http, "/v1/chat/completions", body)
    content = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in
               ch["logprobs"]["content"]]  # fmt: skip
    assert content == want
    # logprobs without top_logprobs: the token alone, an empty list of alternatives
    body.pop("top_logprobs")
    got = post(http, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert got == [{**chat_entry(engine, t, -0.25), "top_logprobs": []} for t, _ in
                   reply_tokens(engine)]  # fmt: skip


def test_completion_body(http: httpx.Client, engine: FakeEngine) -> None:
    got = post(http, "/v1/completions", {"prompt": [5, 6, 7], "logprobs": 2})
    tokens = reply_tokens(engine)
    strs = [s for _, s in tokens]
    offsets = [sum(len(s) for s in strs[:j]) for j in range(len(strs))]
    want = {
        "text_offset": offsets,
        "token_logprobs": [-0.25] * NUM_TOKENS,
        "tokens": strs,
        "top_logprobs": [{s: -0.25, text(engine, t + 1): -2.0} for t, s in tokens],
    }
    assert got["choices"][0]["logprobs"] == want
    chunks = streamed(http, "/v1/completions", {"prompt": [5, 6, 7], "logprobs": 2})
    merged: dict[str, list] = {key: [] for key in want}
    for c in chunks:
        for key in want:
            merged[key] += c["choices"][0]["logprobs"][key]
    assert merged == want
    # logprobs=0: the sampled token alone, as OpenAI lists it
    got = post(http, "/v1/completions", {"prompt": [5, 6, 7], "logprobs": 0})
    assert got["choices"][0]["logprobs"]["top_logprobs"] == [{s: -0.25} for s in strs]
