"""`afd-bench serve` against the fake-engine server: it finishes, counts right, writes JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_engine import FakeEngine, running_server

from afd.bench.cli import main as bench_main
from afd.server.api_server import ServerSettings, build_app


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(token_delay=0.002)


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine) -> Iterator[str]:
    with running_server(build_app(engine, ServerSettings())) as url:
        yield url


def run_bench(base_url: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    argv = ["serve", "--base-url", base_url, "--num-prompts", "8", "--input-len", "16"]
    argv += ["--output-len", "6", "--ignore-eos", "--json", str(out), *extra]
    assert bench_main(argv) == 0
    return json.loads(out.read_text())


def test_completions_poisson(base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = run_bench(base_url, tmp_path, "--request-rate", "200", "--slo-ttft-ms", "10000")
    assert (s["completed"], s["failed"]) == (8, 0)
    assert s["total_input_tokens"] == 8 * 16  # exact lengths via /tokenize
    assert s["total_output_tokens"] == 8 * 6
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert 0 < s["p50_ttft_ms"] <= s["p99_ttft_ms"] and s["mean_tpot_ms"] > 0
    assert s["p90_itl_ms"] > 0 and s["p99_e2el_ms"] >= s["p99_ttft_ms"]
    assert s["config"]["request_rate"] == 200
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_chat_with_concurrency_and_dataset(base_url: str, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Tell me a story."}\n{"prompt": "Hi", "output_len": 3}\n')
    s = run_bench(
        base_url, tmp_path, "--endpoint", "chat", "--max-concurrency", "2",
        "--dataset-path", str(data), "--slo-tpot-ms", "0.000001",
    )  # fmt: skip
    assert s["completed"] == 8 and s["total_output_tokens"] == 4 * 6 + 4 * 3
    assert s["request_goodput"] == 0.0  # nobody meets a 1 ns TPOT
    assert s["config"]["request_rate"] is None  # unbounded rate written as null


def test_failures_are_counted(base_url: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["serve", "--base-url", base_url, "--model", "missing", "--num-prompts", "3"]
    argv += ["--input-len", "4", "--output-len", "2", "--json", str(out)]
    assert bench_main(argv) == 1
    s = json.loads(out.read_text())
    assert s["failed"] == 3 and "404" in s["errors"][0]


def test_unreachable_server_is_a_clean_error(capsys: pytest.CaptureFixture) -> None:
    assert bench_main(["serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 2
    assert "cannot use http://127.0.0.1:9" in capsys.readouterr().out
