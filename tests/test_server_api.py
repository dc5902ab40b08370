"""The OpenAI server end to end: the official `openai` SDK against uvicorn and a fake engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from fake_engine import DEFAULT_REPLY, FakeEngine, running_server

from afd.server.api_server import ServerSettings, build_app

MODEL = "tiny-step3"
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine) -> Iterator[str]:
    with running_server(build_app(engine, ServerSettings())) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=0,
        _strict_response_validation=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def loose_client(base_url: str) -> openai.OpenAI:
    # The SDK's Completion type forbids finish_reason=null, which every stream chunk but the
    # last carries (OpenAI and vLLM alike), so completion streams skip strict validation.
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def reply(i: int) -> str:
    return DEFAULT_REPLY.format(i=i)


def test_models_list(client: openai.OpenAI, base_url: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    raw = httpx.get(base_url + "/v1/models").json()["data"][0]
    assert raw["root"] == "/models/tiny-step3" and raw["max_model_len"] == 512


def test_chat_json(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == reply(0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    num_out = len(engine.tokenizer.encode(reply(0))) + 1  # + EOS
    assert r.usage.prompt_tokens == len(engine.last_prompt)
    assert r.usage.completion_tokens == num_out
    assert r.usage.total_tokens == r.usage.prompt_tokens + num_out
    # chat default budget: the rest of the context
    assert engine.last_params.max_tokens == engine.max_model_len - len(engine.last_prompt)


def collect_chat_stream(stream: openai.Stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in finishes, "two finish chunks for one choice"
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, chunks


def test_chat_stream_format(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, stream=True, stream_options={"include_usage": True}
    )
    texts, finishes, chunks = collect_chat_stream(stream)
    assert texts == {0: reply(0), 1: reply(1)}
    assert finishes == {0: "stop", 1: "stop"}
    first = [c.choices[0] for c in chunks[:2]]
    assert [(c.index, c.delta.role, c.delta.content) for c in first] == [
        (0, "assistant", ""),
        (1, "assistant", ""),
    ]
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_n2_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert [(c.index, c.message.content) for c in r.choices] == [(0, reply(0)), (1, reply(1))]


def test_chat_stop_string(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=["fox", "zzz"])
    choice = r.choices[0]
    assert choice.message.content == reply(0).split("fox")[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == "fox"
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop="fox", stream=True)
    assert collect_chat_stream(stream)[0][0] == reply(0).split("fox")[0]


def test_chat_max_tokens_length(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_chat_sampling_fields_reach_engine(client: openai.OpenAI, engine: FakeEngine) -> None:
    client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0.5, top_p=0.9, seed=7, max_tokens=2,
        presence_penalty=0.5, frequency_penalty=-0.5,
        extra_body={"top_k": 5, "ignore_eos": True, "stop_token_ids": [3]},
    )  # fmt: skip
    p = engine.last_params
    assert (p.temperature, p.top_p, p.seed, p.top_k) == (0.5, 0.9, 7, 5)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)
    assert p.ignore_eos and p.stop_token_ids == [3] and p.max_tokens == 2


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, max_tokens=5
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.logprob == -0.25 for e in entries)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=1, max_tokens=5, stream=True
    )
    streamed = [e for c in stream for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_chat_content_parts(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    assert r.choices[0].message.content == reply(0)


def test_completion_json(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    assert engine.last_prompt[0] == engine.tokenizer.bos_token_id  # add_special_tokens default
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=200)
    assert r.choices[0].text == reply(0) and engine.last_prompt == [5, 6, 7]


def test_completion_many_prompts_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=200)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [reply(0), reply(1), reply(0), reply(1)]
    r = client.completions.create(model=MODEL, prompt=[[5, 6], [7]], max_tokens=1)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 2


def test_completion_stream(loose_client: openai.OpenAI) -> None:
    stream = loose_client.completions.create(
        model=MODEL, prompt=["a", "b"], max_tokens=200, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts: dict[int, str] = {}
    finishes: list[int] = []
    chunks = list(stream)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finishes.append(choice.index)
    assert texts == {0: reply(0), 1: reply(0)} and sorted(finishes) == [0, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_echo_and_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Hi there", echo=True, max_tokens=3)
    assert r.choices[0].text.startswith("Hi there") and len(r.choices[0].text) > 8
    r = client.completions.create(model=MODEL, prompt="Hi there", echo=True, max_tokens=0)
    assert r.choices[0].text == "Hi there" and r.usage.completion_tokens == 0
    r = client.completions.create(model=MODEL, prompt="Hi", logprobs=2, max_tokens=4)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) >= 2 for t in lp.top_logprobs)


def test_stop_in_completion_stream(loose_client: openai.OpenAI) -> None:
    stream = loose_client.completions.create(
        model=MODEL, prompt="x", stop=["brown"], max_tokens=100, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reply(0).split("brown")[0]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_probes_tokenize_metrics(base_url: str, engine: FakeEngine) -> None:
    assert httpx.get(base_url + "/health").status_code == 200
    assert "version" in httpx.get(base_url + "/version").json()
    tok = httpx.post(base_url + "/tokenize", json={"prompt": "hello world"}).json()
    assert tok["tokens"] == engine.tokenizer.encode("hello world", add_special_tokens=True)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    chat_tok = httpx.post(base_url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat_tok["count"] > 5
    text = httpx.post(base_url + "/detokenize", json={"tokens": tok["tokens"][1:]}).json()
    assert text == {"prompt": "hello world"}
    metrics = httpx.get(base_url + "/metrics").text
    assert "afd:e2e_request_latency_seconds_bucket" in metrics
    assert "afd:time_to_first_token_seconds_count" in metrics
    assert 'afd:request_success_total{finished_reason="stop",model_name="tiny-step3"}' in metrics


def test_health_503_when_engine_unhealthy(base_url: str, engine: FakeEngine) -> None:
    engine.healthy = False
    try:
        assert httpx.get(base_url + "/health").status_code == 503
    finally:
        engine.healthy = True


def test_engine_error(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.fail_with = "simulated engine fault"
    try:
        with pytest.raises(openai.InternalServerError, match="simulated engine fault"):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="simulated engine fault"):
            list(stream)
    finally:
        engine.fail_with = None
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES).choices


def test_api_key(engine: FakeEngine) -> None:
    app = build_app(engine, ServerSettings(api_key="sekret", served_model_names=("a", "b")))
    with running_server(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["a", "b"]
        assert good.chat.completions.create(model="b", messages=MESSAGES).model == "b"
        assert httpx.get(url + "/health").status_code == 200  # probes stay open
    assert not engine.in_flight


def test_many_concurrent_streams(base_url: str, engine: FakeEngine) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> dict[int, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=1 + i % 3, stream=True
        )
        texts: dict[int, str] = {}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        return texts

    async def main() -> list[dict[int, str]]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    for i, texts in enumerate(results):
        assert texts == {j: reply(j) for j in range(1 + i % 3)}
    assert not engine.in_flight and not engine.aborted


def test_request_id_header_names_the_response(client: openai.OpenAI, base_url: str) -> None:
    trace = {"X-Request-Id": "trace-42 a/b"}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=trace)
    assert r._request_id == "trace-42 a/b" and r.id == "chatcmpl-trace-42 a/b"
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_headers=trace)
    assert r._request_id == "trace-42 a/b" and r.id == "cmpl-trace-42 a/b"
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, headers=trace) as s:
        assert s.status_code == 200 and s.headers["x-request-id"] == "trace-42 a/b"
        ids = {json.loads(line[6:])["id"] for line in s.iter_lines() if line.startswith("data: {")}
    assert ids == {"chatcmpl-trace-42 a/b"}
    bad = httpx.post(base_url + "/v1/completions", json={"prompt": "hi", "n": 0}, headers=trace)
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "trace-42 a/b"


def test_request_id_generated_without_header(base_url: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    first, second = (httpx.post(base_url + "/v1/chat/completions", json=body) for _ in range(2))
    ids = [r.headers["x-request-id"] for r in (first, second)]
    assert ids[0] != ids[1] and len(ids[0]) >= 16
    assert [r.json()["id"] for r in (first, second)] == [f"chatcmpl-{i}" for i in ids]
    stream = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=stream) as s:
        generated = s.headers["x-request-id"]
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert generated not in ids and {c["id"] for c in chunks} == {f"cmpl-{generated}"}


def test_same_request_id_twice_at_once() -> None:
    """A second request with the client's id starts while the first streams: each gets its
    own engine request and its own whole answer, both named after the client's id."""

    def answer(prompt_len: int) -> str:
        return f"{prompt_len} tokens in." + " la" * 30

    engine = FakeEngine(reply=lambda prompt, i: answer(len(prompt)), token_delay=0.01)
    trace = {"X-Request-Id": "dup"}
    short = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    long = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 20}]}

    async def main(url: str) -> tuple[list[dict], dict]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            async with http.stream("POST", "/v1/chat/completions", json=short, headers=trace) as s:
                lines = s.aiter_lines()
                text = [await anext(lines)]  # the first is in the engine now
                other = await http.post("/v1/chat/completions", json=long, headers=trace)
                text += [line async for line in lines]
        assert other.status_code == 200, other.text
        return [json.loads(line[6:]) for line in text if line.startswith("data: {")], other.json()

    with running_server(build_app(engine, ServerSettings())) as url:
        chunks, other = asyncio.run(main(url))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = other["choices"][0]["message"]["content"]
    assert {c["id"] for c in chunks} == {other["id"]} == {"chatcmpl-dup"}
    num_short, num_long = int(streamed.split()[0]), int(whole.split()[0])
    assert num_short < num_long and (streamed, whole) == (answer(num_short), answer(num_long))
    assert len(set(engine.finished)) == 2 and not engine.aborted and not engine.in_flight


def test_unexpected_error_is_a_500_with_the_request_id() -> None:
    """A route without its own error handling (/health) that raises: the generic 500, in the
    OpenAI error shape, still names the request."""
    engine = FakeEngine()

    def broken() -> bool:
        raise RuntimeError("probe failed")

    engine.is_healthy = broken
    with running_server(build_app(engine, ServerSettings())) as url:
        r = httpx.get(f"{url}/health", headers={"X-Request-Id": "probe-1"}, timeout=10)
        assert r.status_code == 500 and r.headers["x-request-id"] == "probe-1"
        assert r.json()["error"]["type"] == "InternalServerError"
        engine.is_healthy = lambda: True  # and the server keeps serving
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
