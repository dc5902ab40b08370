"""The real afd-serve (API server + coordinator + attention and FFN ranks) on the random test
checkpoint, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time

import httpx
import openai
import pytest

from afd import LLM, SamplingParams
from tests.conftest import serving

pytestmark = pytest.mark.slow
PROMPT_IDS = [11, 250, 37, 99, 123, 7, 64, 900, 3]


def test_chat_and_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=6,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(chat.choices) == 2 and chat.usage.completion_tokens > 0
    assert chat.choices[0].logprobs.content[0].top_logprobs
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=6,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.index for c in finishes) == [0, 1]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    # the SDK types completion chunks' finish_reason as non-null, while servers (OpenAI's
    # included) stream null until the last chunk: validate that one call loosely
    loose = openai.OpenAI(base_url=client.base_url, api_key="none", max_retries=0)
    stream = loose.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    stop = text[3:5]
    assert len(stop) == 2
    stopped = client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].text == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completion_logprobs_equal_offline(client: openai.OpenAI, tiny_ckpt) -> None:
    served = client.completions.create(
        model="tiny",
        prompt=PROMPT_IDS,
        max_tokens=6,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    offline = LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=64, block_size=4).generate(
        [{"prompt_token_ids": PROMPT_IDS}],
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True),
    )
    want = offline[0].outputs[0]
    got = served.choices[0].logprobs.token_logprobs
    expected = [lp[t].logprob for lp, t in zip(want.logprobs, want.token_ids, strict=True)]
    assert len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4


def test_echo_logprobs_equal_offline(server: str, tiny_ckpt) -> None:
    """Prompt logprobs through the coordinator, its token updates and the server's echo."""
    body = {
        "model": "tiny",
        "prompt": PROMPT_IDS,
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
        "ignore_eos": True,
    }
    served = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}) as r:
        first = json.loads(next(line[6:] for line in r.iter_lines() if line.startswith("data: ")))
    offline = LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=64, block_size=4).generate(
        [{"prompt_token_ids": PROMPT_IDS}],
        SamplingParams(
            max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=2, ignore_eos=True
        ),
    )[0]
    tables, out = offline.prompt_logprobs, offline.outputs[0]
    want = [tables[j][t].logprob for j, t in enumerate(PROMPT_IDS) if j > 0]
    want += [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids, strict=True)]
    n = len(PROMPT_IDS)
    for got in (served["logprobs"], first["choices"][0]["logprobs"]):
        assert got["token_logprobs"][0] is None
        values = got["token_logprobs"][1:]
        assert len(values) >= n - 1
        assert max(abs(a - b) for a, b in zip(values, want, strict=False)) < 1e-4
    assert len(served["logprobs"]["tokens"]) == n + 3
    for j in range(1, n):
        entry = served["prompt_logprobs"][j][str(PROMPT_IDS[j])]
        assert abs(entry["rank"] - tables[j][PROMPT_IDS[j]].rank) <= 1  # a near-tie may flip
        assert abs(entry["logprob"] - tables[j][PROMPT_IDS[j]].logprob) < 1e-4


async def read_then_leave(http: httpx.AsyncClient, i: int) -> None:
    body = {
        "model": "tiny",
        "prompt": f"client {i} says",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 2:
                return


def kv_usage(server: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    values = re.findall(r'^afd:kv_cache_usage_perc\{rank="0"\} (\S+)$', text, re.M)
    return float(values[0])


def test_200_disconnecting_clients_leave_no_kv_blocks(server: str) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as http:
            await asyncio.gather(*(read_then_leave(http, i) for i in range(200)))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while kv_usage(server) != 0.0:
        assert time.monotonic() < deadline, f"KV still in use: {kv_usage(server)}"
        time.sleep(0.25)
    assert httpx.get(f"{server}/health").status_code == 200


def test_coordinator_death_fails_in_flight_streams(server: str) -> None:
    """Runs last: it takes the engine down. A stream in flight must end with an error, not
    hang, and /health must turn 503."""
    found = subprocess.run(
        ["pgrep", "-f", "afd.engine.coordinator"], capture_output=True, text=True
    ).stdout.split()
    assert found, "no coordinator process"
    body = {
        "model": "tiny",
        "prompt": "a long one",
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.monotonic()
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        for pid in found:
            subprocess.run(["kill", "-9", pid], check=False)
        rest = list(lines)
    assert time.monotonic() - start < 30
    assert any('"error"' in line for line in rest)
    assert httpx.get(f"{server}/health").status_code == 503


def _children(pid: int, pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_rank_death_while_idle_shows_without_a_request(tiny_ckpt) -> None:
    """No step runs while idle, yet a rank that dies must turn /health 503 within seconds (the
    coordinator looks every 0.5 s), and the next request fails at once instead of hanging."""
    with serving(tiny_ckpt) as (proc, url):
        [coordinator] = _children(proc.pid, "afd.engine.coordinator")
        [ffn_rank] = _children(coordinator, "ffn_worker.worker")
        os.kill(ffn_rank, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 10 s after a rank died"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        assert r.status_code == 500 and "f0" in r.json()["error"]["message"]
