"""Malformed and out-of-range requests: each gets a 4xx with an OpenAI error body, and the
server keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fake_engine import FakeEngine, running_server

from afd.server.api_server import ServerSettings, build_app

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def chat(**fields: object) -> dict:
    return {"model": "tiny-step3", "messages": MSGS, **fields}


def comp(**fields: object) -> dict:
    return {"model": "tiny-step3", "prompt": "hello", **fields}


# (name, path, JSON body or raw bytes, expected status, phrase expected in the message)
CASES: list[tuple[str, str, object, int, str]] = [
    ("invalid json", CHAT, b"{not json", 400, "not valid JSON at character 1"),
    ("invalid utf-8", CHAT, b'{"model": "tiny-step3", "messages": "\xff"}', 400, ""),
    ("body is a list", CHAT, [1, 2], 400, ""),
    ("missing messages", CHAT, {"model": "tiny-step3"}, 400, "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages"),
    ("bad role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    ("content is a number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, ""),
    (
        "text part without text",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "needs its `text`",
    ),
    (
        "image part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "image_url",
    ),
    ("unknown model", CHAT, chat(model="gpt-5"), 404, "does not exist"),
    ("negative temperature", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature not a number", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p above one", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_k negative", CHAT, chat(top_k=-5), 400, "top_k"),
    ("n zero", CHAT, chat(n=0), 400, "n"),
    ("n huge", CHAT, chat(n=100000), 400, "n"),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", CHAT, chat(max_completion_tokens=-5), 400, "max_tokens"),
    ("max_tokens not int", CHAT, chat(max_tokens="lots"), 400, "max_tokens"),
    ("max_tokens past context", CHAT, chat(max_tokens=10**6), 400, "maximum context length"),
    ("presence_penalty", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty", CHAT, chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("seed past int64", CHAT, chat(seed=2**64), 400, "seed"),
    ("min_p above one", CHAT, chat(min_p=1.5), 400, "min_p"),
    ("logit_bias key not an id", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias id past vocab", CHAT, chat(logit_bias={"999999999": 1}), 400, "logit_bias"),
    ("logit_bias too large", CHAT, chat(logit_bias={"5": 500}), 400, "logit_bias"),
    ("repetition_penalty zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("stop is a number", CHAT, chat(stop=5), 400, "stop"),
    ("top_logprobs w/o logprobs", CHAT, chat(top_logprobs=2), 400, "logprobs"),
    ("top_logprobs too big", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("stream_options w/o stream", CHAT, chat(stream_options={"include_usage": True}), 400, ""),
    ("tool_choice w/o tools", CHAT, chat(tool_choice="auto"), 400, "tools"),
    ("empty tools", CHAT, chat(tools=[]), 400, "tools"),
    ("auto w/o parser", CHAT, chat(tools=TOOLS), 400, "enable-auto-tool-choice"),
    (
        "named tool unknown",
        CHAT,
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "not in `tools`",
    ),
    ("bad tool_choice", CHAT, chat(tools=TOOLS, tool_choice="sometimes"), 400, "tool_choice"),
    (
        "forced tool + response_format",
        CHAT,
        chat(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
        400,
        "cannot be combined",
    ),
    (
        "forced tool, bad parameters schema",
        CHAT,
        chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
            tool_choice={"type": "function", "function": {"name": "f"}},
        ),
        400,
        "parameters schema is invalid",
    ),
    (
        "continue + generation prompt",
        CHAT,
        chat(continue_final_message=True),
        400,
        "continue_final_message",
    ),
    ("request chat_template", CHAT, chat(chat_template="{{ 1 }}"), 400, "chat_template"),
    (
        "prompt past context",
        CHAT,
        chat(messages=[{"role": "user", "content": "word " * 2000}]),
        400,
        "maximum context length is 512 tokens",
    ),
    (
        "json_schema not a schema",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}}),
        400,
        "type must be a string",
    ),
    (
        "json_schema without schema",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "json_schema.schema is required",
    ),
    ("response_format type", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format"),
    ("bad guided_regex", COMPLETIONS, comp(guided_regex="("), 400, "guided_regex"),
    ("empty guided_choice", CHAT, chat(guided_choice=[]), 400, "guided_choice"),
    ("bad guided_grammar", CHAT, chat(guided_grammar="start: nope"), 400, "guided_grammar"),
    (
        "two constraints",
        CHAT,
        chat(guided_regex="a", guided_choice=["b"]),
        400,
        "use one structured-output field",
    ),
    (
        "structured_outputs unknown kind",
        COMPLETIONS,
        comp(structured_outputs={"xml": "<a/>"}),
        400,
        "structured_outputs",
    ),
    ("no prompt", COMPLETIONS, {"model": "tiny-step3"}, 400, "prompt"),
    ("empty prompt list", COMPLETIONS, comp(prompt=[]), 400, "prompt"),
    ("empty prompt string", COMPLETIONS, comp(prompt=""), 400, "prompt"),
    ("prompt is an object", COMPLETIONS, comp(prompt={"a": 1}), 400, "prompt"),
    ("negative token id", COMPLETIONS, comp(prompt=[-1]), 400, "out of range"),
    ("token id past vocab", COMPLETIONS, comp(prompt=[10**9]), 400, "out of range"),
    ("mixed prompt list", COMPLETIONS, comp(prompt=["a", 1]), 400, "prompt"),
    ("empty string in a list", COMPLETIONS, comp(prompt=["a", ""]), 400, "empty string"),
    (
        "token prompt past context",
        COMPLETIONS,
        comp(prompt=[5] * 600),
        400,
        "maximum context length is 512 tokens",
    ),
    # refused before tokenizing (seconds of a CPU at these sizes)
    ("megabytes of prompt", COMPLETIONS, comp(prompt="hello world " * 200_000), 400, "bytes"),
    (
        "megabytes of chat",
        CHAT,
        chat(messages=[{"role": "user", "content": "ab " * 10**6}]),
        400,
        "bytes",
    ),
    (
        "lone surrogate",
        COMPLETIONS,
        b'{"model": "tiny-step3", "prompt": "a\\ud800b"}',
        400,
        "not valid Unicode",
    ),
    (
        "infinite temperature",
        COMPLETIONS,
        b'{"model": "tiny-step3", "prompt": "x", "temperature": Infinity}',
        400,
        "temperature",
    ),
    ("logprobs too big", COMPLETIONS, comp(logprobs=21), 400, "logprobs"),
    ("logprobs negative", COMPLETIONS, comp(logprobs=-1), 400, "logprobs"),
    ("suffix", COMPLETIONS, comp(suffix="end"), 400, "suffix"),
    ("best_of", COMPLETIONS, comp(best_of=3), 400, "best_of"),
    ("prompt_logprobs too big", COMPLETIONS, comp(prompt_logprobs=21), 400, "prompt_logprobs"),
    ("prompt_logprobs negative", CHAT, chat(prompt_logprobs=-1), 400, "prompt_logprobs"),
    (
        "prompt_logprobs streamed",
        COMPLETIONS,
        comp(prompt_logprobs=1, stream=True),
        400,
        "prompt_logprobs are not available when stream=true",
    ),
    ("prompt_logprobs chat stream", CHAT, chat(prompt_logprobs=0, stream=True), 400, "stream"),
    ("echo logprobs too big", COMPLETIONS, comp(echo=True, logprobs=21), 400, "logprobs"),
    ("max_tokens zero", COMPLETIONS, comp(max_tokens=0), 400, "max_tokens"),
    ("unknown model", COMPLETIONS, comp(model="nope"), 404, "does not exist"),
    ("tokenize nothing", "/tokenize", {}, 400, "prompt"),
    ("detokenize bad id", "/detokenize", {"tokens": [-3]}, 400, "out of range"),
    ("detokenize bad id names tokens", "/detokenize", {"tokens": [-3]}, 400, "tokens"),
    ("unknown path", "/v1/embeddings", {}, 404, ""),
]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine) -> Iterator[str]:
    with running_server(build_app(engine, ServerSettings())) as url:
        yield url


def test_enough_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name,path,body,status,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_request(base_url: str, name: str, path: str, body: object, status: int, phrase: str):
    with httpx.Client(base_url=base_url, timeout=10) as http:
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            r = http.post(path, content=body, headers=headers)
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == status and isinstance(error["message"], str)
        assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
        assert phrase in error["message"] or phrase == error["param"], error
        assert http.get("/health").status_code == 200


def test_json_error_names_no_field(base_url: str) -> None:
    r = httpx.post(base_url + CHAT, content=b'{"model": 1,', headers={"content-type": "json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None


def test_echo_null_is_off(base_url: str) -> None:
    r = httpx.post(base_url + COMPLETIONS, json=comp(echo=None, max_tokens=2))
    assert r.status_code == 200 and not r.json()["choices"][0]["text"].startswith("hello")


def test_wrong_method_is_405_envelope(base_url: str) -> None:
    r = httpx.get(base_url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_server_still_serves_after_bad_requests(base_url: str, engine: FakeEngine) -> None:
    for _, path, body, _, _ in CASES:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert httpx.post(base_url + path, **kwargs).status_code < 500
    r = httpx.post(base_url + CHAT, json=chat(max_tokens=4))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert not engine.in_flight and not engine.aborted


def test_wrong_api_key_is_401(engine: FakeEngine) -> None:
    with running_server(build_app(engine, ServerSettings(api_key="k"))) as url:
        r = httpx.post(url + CHAT, json=chat(), headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = httpx.post(url + CHAT, json=chat(max_tokens=2), headers={"Authorization": "Bearer k"})
        assert r.status_code == 200


@pytest.mark.parametrize(
    "value", [b"x" * 257, "caf\xe9".encode("latin-1"), "é".encode(), b"a\tb"], ids=str
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_request_id_header(base_url: str, engine: FakeEngine, value: bytes, stream: bool):
    started = len(engine.started)
    headers = {"X-Request-Id": value}
    r = httpx.post(base_url + CHAT, json=chat(stream=stream), headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "X-Request-Id" and r.json()["error"]["code"] == 400
    assert "X-Request-Id header" in r.json()["error"]["message"]
    assert len(engine.started) == started  # refused before any engine work
    longest = "x" * 256
    ok = httpx.post(
        base_url + COMPLETIONS, json=comp(max_tokens=2), headers={"X-Request-Id": longest}
    )
    assert ok.status_code == 200 and ok.json()["id"] == f"cmpl-{longest}"
    assert ok.headers["x-request-id"] == longest and not engine.in_flight


def test_constraint_the_engine_cannot_mask_is_400() -> None:
    """The engine builds its grammars at config.json's vocabulary; when that is smaller than
    the tokenizer's, llguidance refuses it there, so the server, checking at the same width,
    refuses constrained requests with that reason instead of passing them on to fail."""
    engine = FakeEngine()
    engine.vocab_size = engine.tokenizer.vocab_size - 1  # config.json's, below the tokenizer's
    with running_server(build_app(engine, ServerSettings())) as url:
        started = len(engine.started)
        r = httpx.post(url + CHAT, json=chat(guided_choice=["yes", "no"]))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "guided_choice" and "unavailable" in error["message"]
        assert len(engine.started) == started
        r = httpx.post(url + CHAT, json=chat(max_tokens=2))  # unconstrained: served
        assert r.status_code == 200
