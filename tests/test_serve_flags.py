"""afd-serve's start: flags that would start a server which then hangs or crashes on every
request are usage errors naming the flag; a chat template that does not compile fails at start
(it was every chat request's 400); a prompt id past a model vocabulary smaller than its
tokenizer's is a 400 (it crashed the rank that embedded it)."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest
from fake_engine import FakeEngine, running_server

from afd.launch.serve import main
from afd.server.api_server import ServerSettings, build_app
from tests.conftest import copy_ckpt


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs: expected a positive integer"),
        (["--max-num-batched-tokens", "-3"], "--max-num-batched-tokens: expected a positive"),
        (["--block-size", "0"], "--block-size: expected a positive integer"),
        (["--num-kv-blocks", "-1"], "--num-kv-blocks: expected a positive integer"),
        (["--max-model-len", "0"], "--max-model-len: expected a positive integer"),
        (["--port", "70000"], "--port: expected a port in [1, 65535]"),
        (["--tpot-slo-ms", "nan"], "--tpot-slo-ms: expected a positive number"),
        (["--max-logprobs", "-1"], "--max-logprobs: expected an integer >= 0"),
        (["--api-key", ""], "--api-key: expected a value"),  # was: authentication off
        (["--model", ""], "--model: expected a value"),  # was: the tiny model
    ],
)
def test_sizes_that_would_hang_every_request_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "dropped"),
    [
        (["--attn", "2x1"], "--attn 2x1"),
        (["--ffn", "1x2", "--transport", "nccl"], "--ffn 1x2 and --transport nccl"),
    ],
)
def test_colocated_with_rank_flags_is_an_error(
    tiny_ckpt, flags: list[str], dropped: str, capsys: pytest.CaptureFixture
) -> None:
    """They shape disaggregated ranks; with --colocated they were silently ignored."""
    assert main(["--model", str(tiny_ckpt), "--colocated", *flags, "--dry-run"]) == 2
    assert f"--colocated runs one process; drop {dropped}\n" in capsys.readouterr().err


def test_broken_chat_template_fails_at_start(
    tiny_ckpt, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% if %}")
    assert main(["--model", str(tiny_ckpt), "--chat-template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "--chat-template: chat template syntax error (line 1)" in err


def test_a_port_in_use_fails_before_the_model_loads(
    tiny_ckpt, capsys: pytest.CaptureFixture
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["--model", str(tiny_ckpt), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert f"--host 127.0.0.1 --port {port}: cannot bind: Address already in use" in err
    assert "loading" not in out


def test_a_port_taken_while_loading_fails_with_its_flag(tiny_ckpt) -> None:
    """Binding without listening (so that clients are refused while the model loads) lets a
    second server bind the same port: the one that listens second fails, naming the port."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    port = str(other.getsockname()[1])
    serve = [sys.executable, "-m", "afd.launch.serve", "--model", str(tiny_ckpt), "--port", port]
    proc = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "loading" in proc.stdout.readline()  # bound: now the other one listens first
        other.listen()
        _, err = proc.communicate(timeout=240)
    finally:
        other.close()
        proc.kill()
    assert proc.returncode == 2, err
    assert f"afd-serve: error: --port {port}: cannot listen: Address already in use" in err
    assert "Traceback" not in err, err


def test_a_bad_checkpoint_fails_the_start_in_one_line(tiny_ckpt, tmp_path) -> None:
    """The rank that reads the shard fails; the coordinator passes its message to the server,
    which exits with it: no tracebacks from the rank, the coordinator or the server."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    shard = ckpt / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = str(free.getsockname()[1])
    serve = [sys.executable, "-m", "afd.launch.serve", "--model", str(ckpt), "--port", port]
    done = subprocess.run(serve, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr
    reason = f"{shard}: cannot read it as safetensors"
    assert "afd-serve: error: the engine did not start: rank " in done.stderr
    assert reason in done.stderr.splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_prompt_ids_past_a_smaller_model_vocabulary_are_400s() -> None:
    engine = FakeEngine()
    engine.vocab_size = 300  # config.json's, below the tokenizer's
    text = "Count the parameters of the assistant"
    high = max(engine.tokenizer.encode(text))
    assert high >= 300
    with running_server(build_app(engine, ServerSettings())) as url:
        for prompt in (text, [5, high]):
            body = {"model": "tiny-step3", "prompt": prompt, "max_tokens": 2}
            r = httpx.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 400, r.text
            assert f"token id {high} is out of range [0, 300)" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/completions", json={**body, "prompt": [5, 6], "max_tokens": 2})
        assert ok.status_code == 200
