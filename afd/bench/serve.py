"""`afd-bench serve`: load an OpenAI-compatible server and report TTFT, TPOT, ITL, end-to-end
latency, throughput and goodput, as `vllm bench serve` defines them.

Requests stream (`stream_options.include_usage`), arrive as a Poisson process
(`--request-rate`) or all at once, optionally capped by `--max-concurrency`; the run ends
after `--num-prompts` requests. Only `--base-url` is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class Prompt:
    text: str
    token_ids: list[int] | None  # exact-length prompt for /v1/completions when known
    input_len: int
    output_len: int


@dataclass
class Result:
    ok: bool
    input_len: int
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        # vLLM: time per output token after the first; 0 when there is at most one token.
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else 0.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="afd-bench serve", description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=1024, help="random prompts: tokens in")
    p.add_argument("--output-len", type=int, default=128, help="tokens out (max_tokens)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths in len*(1±r)")
    p.add_argument("--dataset-path", type=Path, default=None, help='JSONL: {"prompt": ...}')
    p.add_argument("--request-rate", type=float, default=float("inf"), help="req/s, Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="force output_len tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --input-len and --output-len must be positive")
    if not 0.0 <= args.range_ratio < 1.0:
        p.error("--range-ratio must be in [0, 1)")
    return args


def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))))


async def random_prompts(http: httpx.AsyncClient, args: argparse.Namespace) -> list[Prompt]:
    """Random words cut to an exact token count with the server's /tokenize when it has one."""
    rng = random.Random(args.seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(2000)]
    prompts = []
    for _ in range(args.num_prompts):
        n_in, n_out = (
            _lengths(rng, m, args.range_ratio) for m in (args.input_len, args.output_len)
        )
        text = " ".join(rng.choices(words, k=n_in))
        ids = await _tokenize(http, text)
        if ids is not None and len(ids) >= n_in:
            ids = ids[:n_in]
            text = await _detokenize(http, ids) or text
        prompts.append(Prompt(text, ids, n_in, n_out))
    return prompts


async def _tokenize(http: httpx.AsyncClient, text: str) -> list[int] | None:
    r = await http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    return r.json().get("tokens") if r.status_code == 200 else None


async def _detokenize(http: httpx.AsyncClient, ids: list[int]) -> str | None:
    r = await http.post("/detokenize", json={"tokens": ids})
    return r.json().get("prompt") if r.status_code == 200 else None


def file_prompts(args: argparse.Namespace) -> list[Prompt]:
    rows = [json.loads(line) for line in args.dataset_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{args.dataset_path} holds no prompts")
    prompts = []
    for i in range(args.num_prompts):  # cycle when the file is shorter
        row = rows[i % len(rows)]
        text = row.get("prompt") or row.get("text") or ""
        out = int(row.get("output_len", args.output_len))
        prompts.append(Prompt(text, None, len(text.split()), out))
    return prompts


def request_body(args: argparse.Namespace, model: str, prompt: Prompt) -> tuple[str, dict]:
    body: dict = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "temperature": args.temperature, "ignore_eos": args.ignore_eos,
    }  # fmt: skip
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
        body["max_completion_tokens"] = prompt.output_len
        return "/v1/chat/completions", body
    body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
    body["max_tokens"] = prompt.output_len
    return "/v1/completions", body


async def send(http: httpx.AsyncClient, args: argparse.Namespace, model: str, p: Prompt) -> Result:
    path, body = request_body(args, model, p)
    result = Result(ok=False, input_len=p.input_len)
    try:
        start = time.perf_counter()
        async with http.stream("POST", path, json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            await _read_events(r, result, start)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _read_events(r: httpx.Response, result: Result, start: float) -> None:
    """Time the SSE events; TTFT and ITL count choice-bearing events only (as vLLM does)."""
    last, events = start, 0
    async for line in r.aiter_lines():
        data = line[5:].strip() if line.startswith("data:") else ""
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = str(chunk["error"].get("message"))
            return
        if chunk.get("usage"):
            result.input_len = chunk["usage"]["prompt_tokens"]
            result.output_len = chunk["usage"]["completion_tokens"]
        if chunk.get("choices"):
            now = time.perf_counter()
            if events == 0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last, events = now, events + 1
    result.latency = last - start
    result.output_len = result.output_len or max(events - 1, 0)  # no usage: one per event
    result.ok = events > 0


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        prompts = file_prompts(args) if args.dataset_path else await random_prompts(http, args)
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts))
        rng = random.Random(args.seed + 1)

        async def limited(p: Prompt) -> Result:
            async with gate:
                return await send(http, args, model, p)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms))}
    out.update({f"p{q}_{name}_ms": float(np.percentile(ms, q)) for q in PERCENTILES})
    return out


def summarize(args: argparse.Namespace, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    n_in, n_out = sum(r.input_len for r in ok), sum(r.output_len for r in ok)
    good = [
        r for r in ok
        if (args.slo_ttft_ms is None or r.ttft * 1000 <= args.slo_ttft_ms)
        and (args.slo_tpot_ms is None or r.tpot * 1000 <= args.slo_tpot_ms)
    ]  # fmt: skip
    has_slo = args.slo_ttft_ms is not None or args.slo_tpot_ms is not None
    summary = {
        "model": model, "endpoint": args.endpoint, "base_url": args.base_url,
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "request_rate": args.request_rate if args.request_rate != float("inf") else None,
        "max_concurrency": args.max_concurrency, "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": len(good) / duration if has_slo else None,
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
        "output_throughput": n_out / duration, "total_token_throughput": (n_in + n_out) / duration,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }  # fmt: skip
    summary.update(_stats("ttft", [r.ttft for r in ok]))
    summary.update(_stats("tpot", [r.tpot for r in ok if r.output_len > 1]))
    summary.update(_stats("itl", [gap for r in ok for gap in r.itl]))
    summary.update(_stats("e2el", [r.latency for r in ok]))
    return summary


def format_table(s: dict) -> str:
    rows = [
        ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
        ("Maximum request concurrency", s["max_concurrency"]),
        ("Request rate configured (RPS)", s["request_rate"]),
        ("Benchmark duration (s)", s["duration_s"]),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", s["request_throughput"]),
        ("Request goodput (req/s)", s["request_goodput"]),
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("Total token throughput (tok/s)", s["total_token_throughput"]),
    ]  # fmt: skip
    lines = [f"{' Serving Benchmark Result ':=^50}"]
    lines += [f"{k + ':':<40} {v:.2f}" if isinstance(v, float) else f"{k + ':':<40} {v}"
              for k, v in rows if v is not None]  # fmt: skip
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}  # fmt: skip
    for key, title in titles.items():
        lines.append(f"{title:-^50}")
        for stat in ["mean"] + [f"p{q}" for q in PERCENTILES]:
            label = f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {key.upper()} (ms):"
            lines.append(f"{label:<40} {s[f'{stat}_{key}_ms']:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        print(f"afd-bench serve: cannot use {args.base_url}: {type(e).__name__}: {e}")
        return 2
    print(format_table(summary))
    if summary["errors"]:
        print("errors (first 5):", *summary["errors"], sep="\n  ")
    if args.json is not None:
        args.json.write_text(json.dumps({**summary, "config": asdict_args(args)}, indent=2))
    return 0 if summary["completed"] else 1


def asdict_args(args: argparse.Namespace) -> dict:
    # JSON has no Infinity: an unbounded rate is written as null.
    def plain(v: object) -> object:
        return str(v) if isinstance(v, Path) else None if v == float("inf") else v

    return {k: plain(v) for k, v in vars(args).items()}
